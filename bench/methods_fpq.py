"""Olive and ZeroQuant-FP (with LoRC) against their baselines on the demo model, in one run.

    python bench/methods_fpq.py [--quick]

Olive (outlier-victim pairs, int4/int8 per tensor, activations dynamic per tensor) against plain
INT RTN at the same bits and granularity (min-max scales). ZeroQuant-FP: FP4 E2M1 weights (groups
of 64: the demo's 576-wide layers are not whole groups of 128) with power-of-two and with
unrestricted (fp16) scales, FP8 E4M3 activations per token, and LoRC rank 8, against INT4 weights
(same groups) with INT8 activations; and FP8 against INT8 activations with the same weights. All
rows: round to nearest, the same calibration text (Shakespeare) and held-out windows, perplexity,
its increase over fp32, KL(fp32 || quantized) and bits per weight. ``rows(quick)`` is what
``bench/methods.py`` imports.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

from methods_table import COLUMNS  # bench/ is on the path when a bench script runs

from lowbit import api
from lowbit.eval import format_table
from lowbit.runreport import RunReport
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

GROUP = 64  # the demo's widths (576, 1536) are whole groups of 64, not of 128


def _int_rtn(bits: int) -> Recipe:
    """Plain INT RTN WxAx: symmetric min-max per tensor, activations dynamic per tensor (as Olive's)."""
    w = QuantSpec(f"int{bits}", "tensor", None)
    a = QuantSpec(f"int{bits}", "tensor", None, dynamic=True)
    return Recipe(Scheme(weights=w, input_activations=a), (Step("rtn"),), f"int-rtn-w{bits}a{bits}")


def _w4a8(weights: str, scale_dtype: str, acts: str, lorc: bool = False) -> Recipe:
    w = QuantSpec(weights, "group", GROUP, scale_dtype=scale_dtype)
    a = QuantSpec(acts, "token", None, dynamic=True)
    steps = (Step("zqfp"), Step("lorc", {"rank": 8})) if lorc else (Step("zqfp"),)
    return Recipe(Scheme(weights=w, input_activations=a), steps, "x")


def _preset(name: str) -> Recipe:
    recipe = api.resolve_recipe(name)
    w = recipe.scheme.weights
    if w is not None and w.granularity == "group":
        scheme = dataclasses.replace(recipe.scheme, weights=dataclasses.replace(w, group_size=GROUP))
        recipe = dataclasses.replace(recipe, scheme=scheme, name=f"{name}@g{GROUP}")
    return recipe


# (method, variant, baseline_of, recipe); baseline_of names the method variant a row is the baseline of
def _cases() -> list[tuple[str, str, str, Recipe]]:
    return [
        ("Olive", "INT RTN W4A4", "w4a4-olive", _int_rtn(4)),
        ("Olive", "w4a4-olive", "", _preset("w4a4-olive")),
        ("Olive", "INT RTN W8A8", "w8a8-olive", _int_rtn(8)),
        ("Olive", "w8a8-olive", "", _preset("w8a8-olive")),
        ("ZeroQuant-FP", "INT4-W/INT8-A", "w4a8-fp", _w4a8("int4", "float16", "int8")),
        ("ZeroQuant-FP", "INT4-W/FP8-A", "", _w4a8("int4", "float16", "fp8_e4m3")),
        ("ZeroQuant-FP", "FP4-W pow2/INT8-A", "w4a8-fp", _w4a8("fp4_e2m1", "pow2", "int8")),
        ("ZeroQuant-FP", "FP4-W fp16/FP8-A", "", _w4a8("fp4_e2m1", "float16", "fp8_e4m3")),
        ("ZeroQuant-FP", "w4a8-fp (FP4-W pow2/FP8-A)", "", _preset("w4a8-fp")),
        ("ZeroQuant-FP", "INT4-W/INT8-A +LoRC", "w4a8-fp-lorc", _w4a8("int4", "float16", "int8", lorc=True)),
        ("ZeroQuant-FP", "w4a8-fp-lorc", "", _preset("w4a8-fp-lorc")),
    ]


def _extra(report: RunReport) -> str:
    """Method-specific numbers from the run report, averaged over layers."""

    def mean(key: str) -> float | None:
        values = [r.extra[key] for r in report.layers if key in r.extra]
        return sum(values) / len(values) if values else None

    parts = []
    for key, label, fmt in (
        ("w_outlier_pairs", "W outlier pairs", ".3%"),
        ("a_outlier_pairs", "A outlier pairs", ".3%"),
        ("w_victims_zeroed", "W victims zeroed/layer", ".0f"),
        ("a_victims_zeroed", "A victims zeroed/layer", ".0f"),
        ("fp8_castable", "FP8-castable layers", ".0%"),
        ("lorc_rel_error_before", "W rel err", ".2e"),
        ("lorc_rel_error_after", "with LoRC", ".2e"),
    ):
        value = mean(key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    return ", ".join(parts)


def rows(
    quick: bool,
    methods: tuple[str, ...] = ("Olive", "ZeroQuant-FP"),
    only: tuple[str, ...] = ("",),
    sizes: tuple[int, int, int, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per case of ``methods``: {method, variant, baseline_of, bits_per_weight, ppl,
    ppl_increase_pct, kl, extra} (and ``fp32_ppl``); ``only``: variants containing one of these;
    ``sizes``: (calibration samples, their length, evaluation windows, their length)."""
    original, tok = api.load_model("demo")
    # quick: small enough for a shared 2-core machine (a few minutes a row there), so noisy
    n_calib, calib_len, n_windows, window_len = sizes or ((2, 128, 2, 256) if quick else (32, 512, 16, 512))
    calib = api.calibration_samples(tok, "demo", n_samples=n_calib, seq_len=calib_len, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=window_len, n_windows=n_windows)
    out = []
    for method, variant, baseline_of, recipe in _cases():
        if method not in methods or not any(part in variant for part in only):
            continue
        model = copy.deepcopy(original)
        report = api.quantize(model, recipe, calib, batch_size=4, progress=False)
        res = api.evaluate(model, windows, baseline=original, batch_size=4, progress=False)
        base = res.baseline_perplexity or float("nan")
        row = {
            "method": method,
            "variant": variant,
            "baseline_of": baseline_of,
            "bits_per_weight": api.bits_per_weight(model),
            "ppl": res.perplexity,
            "ppl_increase_pct": 100 * (res.perplexity / base - 1),
            "kl": res.kl,
            "extra": _extra(report),
            "fp32_ppl": base,
        }
        print(f"{method} {variant}: ppl {res.perplexity:.3f} (fp32 {base:.3f}) kl {res.kl:.4f}", flush=True)
        out.append(row)
        del model
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 x 128 calibration and 2 x 256 evaluation tokens")
    ap.add_argument("--methods", default="Olive,ZeroQuant-FP", help="comma-separated: Olive, ZeroQuant-FP")
    ap.add_argument("--only", default="", help="comma-separated parts of variant names, e.g. W4A4,w4a4")
    args = ap.parse_args()
    table = rows(args.quick, tuple(args.methods.split(",")), tuple(args.only.split(",")))
    calib, windows = ("2 x 128", "2 x 256") if args.quick else ("32 x 512", "16 x 512")
    print(f"\nSmolLM2-135M-Instruct, {calib} calibration tokens, {windows} held-out evaluation tokens, "
          f"fp32 perplexity {table[0]['fp32_ppl']:.3f}")  # fmt: skip
    print(format_table(table, COLUMNS))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
