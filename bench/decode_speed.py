"""Benchmark: decoding speed of 4-bit and 8-bit lowbit checkpoints against fp32 PyTorch.

Quantizes the demo model (SmolLM2-135M) with round-to-nearest, the fast way to get each grid,
into a temporary directory (or ``--save DIR``):

- ``w4a16-g64-rtn``: int4 weights in groups of 64, symmetric, fp16 scales (the ``w4a16-rtn``
  preset in groups of 64: the demo's 576-wide layers are not whole groups of 128);
- ``w8a16-rtn``: int8 weights per output channel, symmetric (the ``w8a16`` scheme, RTN);

or takes existing checkpoints (``--checkpoint DIR``, repeatable), then runs ``lowbit bench`` on
each: prefill and decode tokens/s at batch 1 and 8 for fp32 (the dequantized weights in float32
PyTorch), lowbit (QuantLinear), kernels (torch's int4/int8 CPU kernels, bfloat16) and
onnxruntime, with the ratio to fp32 and the memory-bandwidth bound, all measured in one run:

    python bench/decode_speed.py [--repeat 3] [--batch 1,8] [--checkpoint DIR ...] [--json out.json]

Timings on a shared machine vary with the other load: take the best of several runs (--repeat)
and run it alone when the numbers matter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from lowbit import api
from lowbit.presets import get_preset
from lowbit.scheme import QuantSpec, Recipe, Scheme
from lowbit.speed import PATHS, BenchSettings, bench, format_bench

_W4 = get_preset("w4a16-rtn")
assert _W4.scheme.weights is not None
_W4_G64 = dataclasses.replace(_W4.scheme, weights=dataclasses.replace(_W4.scheme.weights, group_size=64))
RECIPES = {
    "w4a16-g64-rtn": Recipe(_W4_G64, name="w4a16-g64-rtn"),
    "w8a16-rtn": Recipe(Scheme(weights=QuantSpec("int8", "channel", None, symmetric=True)), name="w8a16-rtn"),
}


def quantize_demo(out: Path) -> list[Path]:
    """The demo model quantized with each recipe in RECIPES, saved under ``out``."""
    dirs = []
    for name, recipe in RECIPES.items():
        target = out / name
        if api.is_quantized_dir(target):
            print(f"using {target}", file=sys.stderr)
        else:
            print(f"quantizing the demo model: {name} ({recipe.scheme.describe()})", file=sys.stderr)
            model, tok = api.load_model("demo")
            calib = api.calibration_samples(tok, "demo", n_samples=4, seq_len=128)
            report = api.quantize(model, recipe, calib, progress=False)
            api.save_quantized(model, tok, target, report)
        dirs.append(target)
    return dirs


def summary(name: str, rows: list[dict]) -> list[str]:
    """One line per batch size: each path's decode and prefill speed relative to fp32."""
    lines = []
    for batch in sorted({r["batch"] for r in rows}):
        parts = [
            f"{r['path']} decode {r['decode_x_fp32']:.2f}x prefill {r['prefill_x_fp32']:.2f}x"
            for r in rows
            if r["batch"] == batch and r["path"] != "fp32" and r["decode_x_fp32"] is not None
        ]
        lines.append(f"{name} batch {batch}: " + "; ".join(parts) + " (vs fp32 PyTorch)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="lowbit checkpoint to bench (repeatable)")
    ap.add_argument("--save", default=None, help="keep the demo checkpoints here (reused when present)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = ap.parse_args()

    settings = BenchSettings(
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batches=tuple(int(b) for b in args.batch.split(",")),
        paths=tuple(args.paths.split(",")),
        threads=args.threads,
        repeat=args.repeat,
    )
    settings.check()
    with tempfile.TemporaryDirectory(prefix="lowbit-decode-") as tmp:
        dirs = [Path(c) for c in args.checkpoint] or quantize_demo(Path(args.save or tmp))
        results, lines = [], []
        for d in dirs:
            print(f"benchmarking {d}", file=sys.stderr, flush=True)
            result = bench(str(d), settings, lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
            print(format_bench(result) + "\n", flush=True)
            results.append(result.to_dict())
            lines += summary(d.name, result.rows)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
