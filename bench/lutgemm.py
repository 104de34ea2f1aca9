"""LUT-GEMM's CPU reference at batch 1 against dequantize-then-matmul and against an fp32 matmul.

    python bench/lutgemm.py [--repeat 30] [--bits 3] [--mu 8] [--threads 1]

For each shape (out x in; the demo model's 576x576, 1536x576, 576x1536 and a larger 4096x4096)
a random BCQ weight in groups of 64, then per call at batch 1:

- ``lut``: lowbit.lutgemm (tables of 2^mu signed sums per mu activations, one look-up per
  bit-plane, row and mu columns; the keys are computed once, as a kernel stores them);
- ``dequant``: ``BCQWeight.dequantize()`` then ``x @ W^T`` (what a runtime without a LUT kernel does);
- ``fp32``: ``x @ W^T`` with the float weight already in memory (no quantization).

The three are run in turns for ``--repeat`` rounds and the best time of each is kept (shared
machines are noisy); the ratios are what to read, absolute times are this machine's. Also printed:
the largest difference between the LUT and dequantized outputs, and the weight bytes each reads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lowbit.bcq import BCQWeight
from lowbit.lutgemm import LutGemm
from lowbit.scheme import QuantSpec

SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096))


def random_weight(out: int, inp: int, bits: int, group: int, seed: int = 0) -> BCQWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g).to(torch.uint8)
    alpha = (torch.rand(out, inp // group, bits, generator=g) * 0.05).half()
    offset = (torch.randn(out, inp // group, generator=g) * 0.01).half()
    return BCQWeight(codes, alpha, offset, group, QuantSpec(f"uint{bits}", "group", group, False))


def best_times(fns: dict[str, Callable[[], torch.Tensor]], repeat: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm up
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(out: int, inp: int, bits: int, mu: int, group: int, repeat: int) -> dict[str, float]:
    w = random_weight(out, inp, bits, group)
    lut = LutGemm(w, mu)
    dense = w.dequantize()
    x = torch.randn(1, inp)
    fns = {"lut": lambda: lut(x), "dequant": lambda: x @ w.dequantize().t(), "fp32": lambda: x @ dense.t()}
    with torch.no_grad():
        t = best_times(fns, repeat)
        diff = float((lut(x) - x @ dense.t()).abs().max())
    return {
        "lut_us": t["lut"] * 1e6,
        "dequant_us": t["dequant"] * 1e6,
        "fp32_us": t["fp32"] * 1e6,
        "lut_vs_dequant": t["dequant"] / t["lut"],
        "lut_vs_fp32": t["fp32"] / t["lut"],
        "max_diff": diff,
        "weight_bytes_bcq": (out * inp * bits + (w.alpha.numel() + w.offset.numel()) * 16) / 8,
        "weight_bytes_fp32": out * inp * 4,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--mu", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"batch 1, BCQ {args.bits}-bit, groups of {args.group_size}, mu {args.mu}, {args.threads} thread(s), "
        f"best of {args.repeat}"
    )
    names = (("shape", 11), ("lut us", 9), ("dequant us", 11), ("fp32 us", 9), ("dequant/lut", 12), ("fp32/lut", 9))
    print(" ".join(f"{n:>{k}}" for n, k in names), f"{'max diff':>9}")
    for out, inp in SHAPES:
        r = measure(out, inp, args.bits, args.mu, args.group_size, args.repeat)
        print(
            f"{out:>5}x{inp:<5} {r['lut_us']:>9.0f} {r['dequant_us']:>11.0f} {r['fp32_us']:>9.0f} "
            f"{r['lut_vs_dequant']:>11.2f}x {r['lut_vs_fp32']:>8.2f}x {r['max_diff']:>9.1e}"
        )
    print("dequant/lut > 1: LUT-GEMM is faster than dequantize-then-matmul; fp32/lut < 1: slower than a float matmul")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
