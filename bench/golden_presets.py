"""Record, or check, the tensors every preset and method writes on a model.

    python bench/golden_presets.py --record bench/golden/demo.json   # before a change
    python bench/golden_presets.py --check bench/golden/demo.json    # after it

Quantizes a copy of the model with each of ``lowbit.golden.golden_recipes()`` (presets whose
groups do not divide the model's widths run in the largest group size that does, as the CLI's
default does) on a small calibration set, saves each checkpoint, and compares one SHA-256 per
tensor. Runs on one thread: the digests are only comparable with the same summation order.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit import api
from lowbit.golden import checkpoint_digests, compare, golden_recipes
from lowbit.preflight import fitting_group_size
from lowbit.scheme import with_group_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="JSON")
    mode.add_argument("--check", metavar="JSON")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="demo")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = api.load_model(args.model)
    calib = api.calibration_samples(tok, args.data, n_samples=args.samples, seq_len=args.seq_len)
    recipes = golden_recipes()
    if args.only:
        recipes = {k: v for k, v in recipes.items() if k in args.only.split(",")}
    recorded = json.loads(Path(args.check).read_text()) if args.check else {}
    results: dict[str, dict[str, str]] = {}
    failed = 0
    for name, recipe in recipes.items():
        start = time.perf_counter()
        g = fitting_group_size(recipe, model)
        if g is not None:
            recipe = with_group_size(recipe, g)
        work = copy.deepcopy(model)
        report = api.quantize(work, recipe, calib, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            api.save_quantized(work, None, f"{tmp}/ckpt", report)
            results[name] = checkpoint_digests(f"{tmp}/ckpt")
        line = f"{name:<16} {len(results[name]):4d} tensors  {time.perf_counter() - start:6.1f} s"
        if args.check:
            diff = compare(recorded.get(name, {}), results[name])
            failed += bool(diff)
            line += "  identical" if not diff else f"  {len(diff)} differ: " + "; ".join(diff[:3])
        print(line, flush=True)
    if args.record:
        with open(args.record, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"recorded {len(results)} recipes in {args.record}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
