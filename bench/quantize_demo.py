"""Benchmark: `lowbit quantize` (preset w4a16: GPTQ, int4, here in groups of 64) on the demo model.

Prints the wall time and peak memory of the quantize command (run as a child process, so its
peak resident memory is its own), next to the time of one fp32 forward pass over the same
calibration set, the fp32 model's size and the size of the calibration activations (every
block's input hidden states, what a method that kept them all would hold), all measured in
this run. The GPTQ solve time (summed over layers, from the run report) is printed apart from
the forward passes that collect Hessians:

    python bench/quantize_demo.py [--samples 128] [--seq-len 512] [--preset w4a16] [--group-size 64]

lowbit quantizes whole groups only; the demo's 576-wide layers are not whole groups of 128, so a
group-wise preset runs in groups of ``--group-size`` (written to a recipe file for the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lowbit.presets import get_preset
from lowbit.scheme import to_dict


def fp32_forward_seconds(samples: int, seq_len: int, batch_size: int) -> tuple[float, int, int]:
    """Seconds of one fp32 forward pass over the calibration set, the model's parameter bytes
    and the bytes of every block's input hidden states over that set."""
    from lowbit.data import calibration_samples
    from lowbit.models import load_model

    model, tok = load_model("demo")
    calib = calibration_samples(tok, "demo", n_samples=samples, seq_len=seq_len, seed=0)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in calib.split(batch_size):
            model(input_ids=batch, use_cache=False)
    seconds = time.perf_counter() - start
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    activations = calib.numel() * cfg.hidden_size * (cfg.num_hidden_layers + 1) * 4
    return seconds, nbytes, activations


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--preset", default="w4a16")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()

    fwd_s, model_bytes, act_bytes = fp32_forward_seconds(args.samples, args.seq_len, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = get_preset(args.preset)
        if recipe.scheme.weights is not None and recipe.scheme.weights.granularity == "group":
            weights = dataclasses.replace(recipe.scheme.weights, group_size=args.group_size)
            recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, weights=weights))
        Path(f"{tmp}/recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe)))
        cmd = [
            sys.executable, "-m", "lowbit.cli", "quantize", "demo", "--recipe", f"{tmp}/recipe.yaml",
            "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--no-eval", "--quiet", "--out", f"{tmp}/out",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        quant_s = time.perf_counter() - start
        layers = json.loads(Path(f"{tmp}/out/lowbit.json").read_text())["report"]["layers"]
        solve_s = sum(layer["extra"].get("seconds", 0.0) for layer in layers)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    tokens = args.samples * args.seq_len
    print(f"demo model SmolLM2-135M, preset {args.preset} (groups of {args.group_size}), ", end="")
    print(f"calibration {args.samples} x {args.seq_len} tokens")
    print(f"fp32 forward over the calibration set : {fwd_s:8.1f} s  ({tokens / fwd_s:.0f} tokens/s)")
    print(f"lowbit quantize (whole command)       : {quant_s:8.1f} s  = {quant_s / fwd_s:.2f} x one fp32 forward")
    print(f"  of which GPTQ solves (all layers)   : {solve_s:8.1f} s")
    print(f"fp32 parameters                       : {model_bytes / 2**20:8.0f} MiB")
    print(f"calibration activations (all blocks)  : {act_bytes / 2**20:8.0f} MiB")
    both = model_bytes + act_bytes
    print(f"lowbit quantize peak resident memory  : {peak / 2**20:8.0f} MiB = {peak / model_bytes:.2f} x fp32 params")
    print(f"                                        = {peak / both:.2f} x (fp32 params + calibration activations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
