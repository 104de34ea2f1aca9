"""LUT-GEMM's BCQ against RTN and GPTQ at the same bits and group, on the demo model.

    python bench/methods_bcq.py [--quick] [--bits 3,2] [--only BCQ]

Every variant quantizes the demo model (SmolLM2-135M-Instruct) in groups of 64 (128 does not
divide its 576-wide layers) and is evaluated on the same held-out Shakespeare windows against
the fp32 model: perplexity, its increase, KL(fp32 || quantized) per token and bits per weight.

- ``RTN W{b} g64``: the ``w{b}a16`` preset's scheme (asymmetric uint grid, MSE-clipped ranges,
  fp16 scales) rounded to nearest; ``GPTQ W{b} g64``: the ``w{b}a16`` preset (GPTQ, act-order,
  static groups) in groups of 64;
- ``BCQ W{b} g64``: the ``w{b}a16-bcq`` preset (greedy start + 10 rounds of alternating least
  squares, data-free); ``BCQ-aware W{b} g64``: the ``bcq_aware`` step (errors weighted by the
  inputs' diag(H), our activation-aware variant) on the same scheme.

BCQ stores q alphas and an offset per group in fp16, so at the same bits and group it spends more
bits per weight than the uniform grid (one fp16 scale and a b-bit zero point): the column says how
many. ``--quick``: 3-bit only, fewer calibration and evaluation tokens, no activation-aware row.
``rows(quick)`` is what ``bench/methods.py`` imports.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from typing import Any

from methods_table import COLUMNS  # bench/ is on the path when a bench script runs

from lowbit import api
from lowbit.eval import format_table
from lowbit.presets import get_preset
from lowbit.scheme import Recipe, Step, with_group_size

GROUP = 64


def variants(quick: bool, bits_list: tuple[int, ...] | None = None) -> list[tuple[str, str, str, Recipe]]:
    """(method, variant, baseline_of, recipe) for each run."""
    out = []
    for bits in bits_list or ((3,) if quick else (3, 2)):
        grid = with_group_size(get_preset(f"w{bits}a16"), GROUP)
        rtn = dataclasses.replace(grid, steps=(Step("rtn"),), name=f"w{bits}a16-g{GROUP}-rtn")
        bcq = get_preset(f"w{bits}a16-bcq")
        out += [
            ("RTN", f"RTN W{bits} g{GROUP}", "bcq", rtn),
            ("GPTQ", f"GPTQ W{bits} g{GROUP}", "bcq", grid),
            ("LUT-GEMM/BCQ", f"BCQ W{bits} g{GROUP}", "", bcq),
        ]
        if not quick:
            aware = dataclasses.replace(bcq, steps=(Step("bcq_aware", {"rounds": 10}),), name=f"w{bits}a16-bcq-aware")
            out.append(("LUT-GEMM/BCQ", f"BCQ-aware W{bits} g{GROUP}", "", aware))
    return out


def _extra(report: Any, seconds: float) -> str:
    """Mean over layers of BCQ's fitted error at the end relative to its greedy start, and the time."""
    ratios = [
        layer.extra["bcq_error"] / layer.extra["bcq_error_start"]
        for layer in report.layers
        if layer.extra.get("bcq_error_start")
    ]
    fit = f"fit err end/start {sum(ratios) / len(ratios):.3f}; " if ratios else ""
    return f"{fit}quantize {seconds:.0f}s"


def rows(
    quick: bool, bits: tuple[int, ...] | None = None, only: str = "", sizes: tuple[int, int, int, int] | None = None
) -> list[dict[str, Any]]:
    """``sizes``: (calibration samples, their length, evaluation windows, their length)."""
    samples, seq_len, windows_n, window_len = sizes or ((8, 512, 4, 512) if quick else (32, 512, 16, 512))
    original, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=samples, seq_len=seq_len, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=window_len, n_windows=windows_n)
    out = []
    for method, variant, baseline_of, recipe in variants(quick, bits):
        if only and not variant.startswith(only):
            continue
        model = copy.deepcopy(original)
        start = time.perf_counter()
        report = api.quantize(model, recipe, calib, progress=False)
        seconds = time.perf_counter() - start
        res = api.evaluate(model, windows, baseline=original, progress=False)
        base = res.baseline_perplexity or float("nan")
        out.append(
            {
                "method": method,
                "variant": variant,
                "baseline_of": baseline_of,
                "bits_per_weight": api.bits_per_weight(model),
                "ppl": res.perplexity,
                "ppl_increase_pct": 100 * (res.perplexity / base - 1),
                "kl": res.kl,
                "extra": _extra(report, seconds),
                "fp32_ppl": base,
            }
        )
        print(f"{variant}: ppl {res.perplexity:.3f} (fp32 {base:.3f})", flush=True)
        del model
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bits", default=None, help="comma-separated bit widths (default: 3 with --quick, else 3,2)")
    ap.add_argument("--only", default="", help="run only the variants whose name starts with this (e.g. BCQ)")
    args = ap.parse_args()
    table = rows(args.quick, tuple(int(b) for b in args.bits.split(",")) if args.bits else None, args.only)
    samples, windows_n = (8, 4) if args.quick else (32, 16)
    print(
        f"\nSmolLM2-135M-Instruct, {samples} x 512 calibration tokens, {windows_n} x 512 held-out tokens, "
        f"fp32 perplexity {table[0]['fp32_ppl']:.3f}"
    )
    print(format_table(table, COLUMNS))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
