"""Benchmark: peak memory of the block source on the demo model (SmolLM2-135M, Q4_1 GGUF).

Each case runs in its own child process, which prints its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- ``imports``: torch, transformers and lowbit imported, nothing else (the floor of every case);
- GGUF conversion, streaming (``models._convert_gguf``: one tensor dequantized at a time into
  shards of at most 1 GB, or of ``--small-shard`` MB) against the old way (``_convert_gguf_whole``:
  transformers loads and dequantizes the whole model, then ``save_pretrained``); both convert the
  tokenizer too, with transformers;
- ``ShardSource`` on the converted directory: the skeleton and index only, one decoder block
  loaded, and every tensor loaded (outer + all blocks), against ``models.load_model``. The loaded
  tensors are memory-mapped views of the files, so each case reads them all once (as a forward
  pass would); otherwise their pages would never count.

    PYTHONPATH=src python bench/source_memory.py [--small-shard 64]

Prints MiB per case and the ratios, also with the ``imports`` floor taken off.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PRELUDE = """
import resource, sys
from pathlib import Path
import torch, transformers
from lowbit import models, source
from lowbit.cache import fetch_demo_model
gguf_path = fetch_demo_model()


def touch(model):  # read every loaded tensor, as a forward pass does (the files are memory-mapped)
    return sum(float(t.sum()) for t in model.state_dict().values() if not t.is_meta)
"""

CASES = {
    "imports": "",
    "convert streaming (1 GB shards)": "models._convert_gguf(gguf_path, Path(sys.argv[1]) / 'stream')",
    "convert streaming (small shards)": "models._convert_gguf(gguf_path, Path(sys.argv[1]) / 'small', SMALL)",
    "convert whole (transformers)": "models._convert_gguf_whole(gguf_path, Path(sys.argv[1]) / 'whole')",
    "ShardSource skeleton": "s = source.ShardSource(Path(sys.argv[1]) / 'stream')",
    "ShardSource one block": (
        "s = source.ShardSource(Path(sys.argv[1]) / 'stream'); s.load(s.blocks + '.0'); touch(s.model)"
    ),
    "ShardSource all": (
        "s = source.ShardSource(Path(sys.argv[1]) / 'stream'); s.load_outer()\n"
        "for i in range(s.model.config.num_hidden_layers): s.load(f'{s.blocks}.{i}')\n"
        "touch(s.model)"
    ),
    "load_model (whole)": "m, t = models.load_model(str(Path(sys.argv[1]) / 'stream')); touch(m)",
}


def peak_mib(code: str, work: Path, small_bytes: int) -> float:
    body = PRELUDE + f"SMALL = {small_bytes}\n" + code + "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body), str(work)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"case failed:\n{code}\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-shard", type=int, default=64, help="MiB per shard of the small-shard conversion")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        peaks = {}
        for name, code in CASES.items():  # in order: the conversions write what the source cases read
            peaks[name] = peak_mib(code, work, args.small_shard << 20)
            print(f"{name:36s} {peaks[name]:8.0f} MiB", flush=True)
    floor = peaks["imports"]

    def ratio(a: str, b: str) -> str:
        return f"{peaks[a] / peaks[b]:.2f} (above imports: {(peaks[a] - floor) / max(peaks[b] - floor, 1):.2f})"

    print()
    for label, a, b in [
        ("streaming / whole conversion", "convert streaming (1 GB shards)", "convert whole (transformers)"),
        ("small shards / whole conversion", "convert streaming (small shards)", "convert whole (transformers)"),
        ("ShardSource one block / all", "ShardSource one block", "ShardSource all"),
        ("ShardSource one block / load_model", "ShardSource one block", "load_model (whole)"),
        ("ShardSource all / load_model", "ShardSource all", "load_model (whole)"),
    ]:
        print(f"{label:42s} {ratio(a, b)}")


if __name__ == "__main__":
    main()
