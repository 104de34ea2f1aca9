"""Benchmark: `lowbit quantize` (RTN W4A16 group 128) on the demo model.

Prints the wall time and peak memory of the quantize command (run as a child process, so its
peak resident memory is its own), next to the time of one fp32 forward pass over the same
calibration set and the fp32 model's size, all measured in this run:

    python bench/quantize_demo.py [--samples 16] [--seq-len 512] [--preset w4a16]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

import torch


def fp32_forward_seconds(samples: int, seq_len: int, batch_size: int) -> tuple[float, int]:
    """Seconds of one fp32 forward pass over the calibration set, and the model's parameter bytes."""
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
    return seconds, nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--preset", default="w4a16")
    args = ap.parse_args()

    fwd_s, model_bytes = fp32_forward_seconds(args.samples, args.seq_len, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "lowbit.cli", "quantize", "demo", "--preset", args.preset,
            "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--no-eval", "--quiet", "--out", f"{tmp}/out",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        quant_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    tokens = args.samples * args.seq_len
    print(f"demo model SmolLM2-135M, preset {args.preset}, calibration {args.samples} x {args.seq_len} tokens")
    print(f"fp32 forward over the calibration set : {fwd_s:8.1f} s  ({tokens / fwd_s:.0f} tokens/s)")
    print(f"lowbit quantize (whole command)       : {quant_s:8.1f} s  = {quant_s / fwd_s:.2f} x one fp32 forward")
    print(f"fp32 parameters                       : {model_bytes / 2**20:8.0f} MiB")
    print(f"lowbit quantize peak resident memory  : {peak / 2**20:8.0f} MiB = {peak / model_bytes:.2f} x fp32 params")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
