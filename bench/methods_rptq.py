"""RPTQ and MoFQ on the demo model, against their baselines, in one run.

    python bench/methods_rptq.py [--quick]

RPTQ: W4A8 and W8A8 with per-cluster static activations (the presets, weights in groups of 64
since 576 is not whole groups of 128) against the same weights with static per-tensor and with
dynamic per-token activations (all uint8, asymmetric); then the activation reconstruction loss
``sum ||Q(X) - X||² / sum ||X||²`` over every linear input of the float model with one range per
cluster (K-means, k = 4 .. 64) against one range per channel and one per tensor, with the
perplexity of each as activation-only (W16A8) quantization.

MoFQ: W4 (groups of 64, weight-only) and W8A8 (per-channel weights, dynamic per-token
activations): all-INT, all-FP and MoFQ by each metric (tensor, layer, model), all RTN; how many
layers chose FP; and, over the layers of the model-metric run, Spearman's rank correlation between
the tensor-MSE advantage of INT (``mse_fp - mse_int``) and its model-KL advantage
(``kl_fp - kl_int``): does lower tensor MSE give lower model error?

``rows(quick)`` gives the table's rows (``bench/methods.py`` prints all methods together).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from typing import Any

import torch
from methods_table import COLUMNS  # bench/ is on the path when a bench script runs
from torch import nn

from lowbit import api
from lowbit.algorithms.mofq import rank_correlation
from lowbit.clusters import ChannelRangeObserver, channel_clusters
from lowbit.eval import format_table
from lowbit.hooks import forward_pre_hooks
from lowbit.modules import ActQuantizer
from lowbit.presets import get_preset
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

A8_TENSOR = QuantSpec("uint8", "tensor", None, symmetric=False)
A8_TOKEN = QuantSpec("uint8", "token", None, symmetric=False, dynamic=True)
W4_G64 = QuantSpec("int4", "group", 64, symmetric=True, scale_dtype="float16", observer="mse",
                   observer_args={"maxshrink": 0.2})  # fmt: skip
W8_CH = QuantSpec("int8", "channel", None, symmetric=True, observer="mse", observer_args={"maxshrink": 0.2})
A8_TOKEN_SYM = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)
CLUSTER_COUNTS = (4, 16, 64)


def _setup(
    quick: bool,
    sizes: tuple[int, int, int, int] | None = None,
    mofq_blocks: int | None = None,
    rptq_weights: str = "gptq",
) -> dict[str, Any]:
    """``sizes``: (calibration samples, their length, evaluation windows, their length), default by
    ``quick``; ``mofq_blocks``: MoFQ on the first this many blocks (0: all; default 4 when quick);
    ``rptq_weights``: the RPTQ rows' weight quantizer, ``gptq`` (the presets') or ``rtn``."""
    torch.manual_seed(0)
    model, tok = api.load_model("demo")
    n, t, w, wl = sizes or ((4, 128, 2, 256) if quick else (32, 512, 16, 512))
    calib = api.calibration_samples(tok, "demo", n_samples=n, seq_len=t, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=wl, n_windows=w)
    blocks = (4 if quick else 0) if mofq_blocks is None else mofq_blocks
    return {"model": model, "calib": calib, "windows": windows, "quick": quick, "mofq_blocks": blocks,
            "rptq_weights": rptq_weights}  # fmt: skip


def _run(setup: dict[str, Any], recipe: Recipe) -> tuple[dict[str, Any], Any, float]:
    """Quantize a copy of the demo model and evaluate it: (numbers, run report, seconds)."""
    model = copy.deepcopy(setup["model"])
    start = time.perf_counter()
    report = api.quantize(model, recipe, setup["calib"], progress=False)
    seconds = time.perf_counter() - start
    res = api.evaluate(model, setup["windows"], baseline=setup["model"], progress=False)
    base = res.baseline_perplexity or float("nan")
    setup["base_ppl"] = base
    numbers = {
        "bits_per_weight": api.bits_per_weight(model),
        "ppl": res.perplexity,
        "ppl_increase_pct": 100 * (res.perplexity / base - 1),
        "kl": res.kl,
    }
    print(f"  {recipe.name}: ppl {res.perplexity:.3f} (fp32 {base:.3f}), KL {res.kl:.4f}, {seconds:.0f} s", flush=True)
    return numbers, report, seconds


def _row(method: str, variant: str, baseline_of: str | None, numbers: dict[str, Any], extra: str) -> dict[str, Any]:
    return {"method": method, "variant": variant, "baseline_of": baseline_of, **numbers, "extra": extra}


# --- RPTQ ---------------------------------------------------------------------------------------


def _weights_steps(recipe: Recipe, rtn: bool) -> tuple[Step, ...]:
    """The preset's weight quantizer (GPTQ), or RTN (quick mode, or ``rptq_weights="rtn"``)."""
    return (Step("rtn"),) if rtn else tuple(s for s in recipe.steps if s.name != "rptq")


def rptq_rows(setup: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    presets = (("w4a8-rptq", W4_G64),) if setup["quick"] else (("w4a8-rptq", W4_G64), ("w8a8-rptq", None))
    for preset, weights in presets:
        base = get_preset(preset)
        w = weights or base.scheme.weights
        rtn = setup["quick"] or setup["rptq_weights"] == "rtn"
        quantizer = _weights_steps(base, rtn)
        tag = " (rtn)" if rtn else ""
        variants = [
            (f"{preset}{tag}", base.scheme.input_activations, (Step("rptq"), *quantizer), None),
            (f"W{w.bits}A8 static per-tensor{tag}", A8_TENSOR, quantizer, preset),
            (f"W{w.bits}A8 dynamic per-token{tag}", A8_TOKEN, quantizer, preset),
        ]
        for name, acts, steps, baseline_of in variants:
            recipe = Recipe(Scheme(weights=w, input_activations=acts), steps, name)
            numbers, report, seconds = _run(setup, recipe)
            extra = f"{seconds:.0f} s"
            if baseline_of is None:
                contiguous = [r.extra.get("rptq_contiguous", 0.0) for r in report.layers]
                extra = f"32 clusters, contiguous in {int(sum(contiguous))}/{len(contiguous)} inputs; " + extra
            out.append(_row("RPTQ", name, baseline_of, numbers, extra))
    return out


def _linear_inputs(model: nn.Module) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]


def _observe(observer: ChannelRangeObserver) -> Any:
    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        observer.update(inp[0])

    return hook


@torch.no_grad()
def reconstruction(setup: dict[str, Any], counts: tuple[int, ...]) -> dict[str, float]:
    """``sum ||Q(X) - X||² / sum ||X||²`` over every linear input of the float model on the
    calibration set, per range choice: ``tensor``, ``k=<count>`` clusters, ``channel``."""
    model, calib = setup["model"], setup["calib"][:8]
    linears = _linear_inputs(model)
    observers = {lin: ChannelRangeObserver() for lin in linears}
    with forward_pre_hooks({lin: _observe(obs) for lin, obs in observers.items()}):
        model(input_ids=calib)
    quantizers: dict[nn.Linear, dict[str, ActQuantizer]] = {}
    for lin, obs in observers.items():
        lo, hi = obs.range()
        qs = {"tensor": ActQuantizer(A8_TENSOR)}
        qs["tensor"].set_range(lo.min(), hi.max())
        for k in counts:
            spec = QuantSpec("uint8", "cluster", None, symmetric=False, clusters=k)
            qs[f"k={k}"] = ActQuantizer(spec, channel_clusters(lo, hi, k))
            qs[f"k={k}"].set_range(lo, hi)
        chan = ActQuantizer(QuantSpec("uint8", "cluster", None, symmetric=False, clusters=lo.numel()))
        chan.cluster_idx = torch.arange(lo.numel())  # one cluster per channel: per-channel ranges
        chan.set_range(lo, hi)
        qs["channel"] = chan
        quantizers[lin] = qs
    num: dict[str, float] = {}
    den = [0.0]

    def hook(lin: nn.Linear) -> Any:
        def run(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            x = inp[0].float()
            den[0] += float(x.double().pow(2).sum())
            for key, q in quantizers[lin].items():
                num[key] = num.get(key, 0.0) + float((q(x) - x).double().pow(2).sum())

        return run

    with forward_pre_hooks({lin: hook(lin) for lin in linears}):
        model(input_ids=calib)
    return {key: value / den[0] for key, value in num.items()}


def recon_rows(setup: dict[str, Any]) -> list[dict[str, Any]]:
    counts = CLUSTER_COUNTS[:2] if setup["quick"] else CLUSTER_COUNTS
    recon = reconstruction(setup, counts)
    out = []
    for k in counts:
        spec = QuantSpec("uint8", "cluster", None, symmetric=False, clusters=k)
        numbers, _, _ = _run(setup, Recipe(Scheme(input_activations=spec), (Step("rptq"),), f"w16a8-rptq-k{k}"))
        ratio = recon[f"k={k}"] / recon["channel"]
        extra = f"act recon {recon[f'k={k}']:.3e} = {ratio:.2f}x per-channel ({recon['channel']:.3e})"
        out.append(_row("RPTQ", f"W16A8 {k} clusters", None, numbers, extra))
    numbers, _, _ = _run(setup, Recipe(Scheme(input_activations=A8_TENSOR), (), "w16a8-tensor"))
    ratio = recon["tensor"] / recon["channel"]
    extra = f"act recon {recon['tensor']:.3e} = {ratio:.2f}x per-channel"
    out.append(_row("RPTQ", "W16A8 static per-tensor", "W16A8 clusters", numbers, extra))
    return out


# --- MoFQ ---------------------------------------------------------------------------------------


def _fp_count(report: Any) -> str:
    chosen = [r.extra.get("mofq_fp", 0.0) for r in report.layers]
    return f"FP in {int(sum(chosen))}/{len(chosen)} layers"


def _spearman(report: Any) -> float:
    """Over the layers: rank correlation of INT's tensor-MSE advantage and its model-KL advantage."""
    layers = [r.extra for r in report.layers if "mofq_int_model" in r.extra]
    mse = [e["mofq_fp_tensor"] - e["mofq_int_tensor"] for e in layers]
    kl = [e["mofq_fp_model"] - e["mofq_int_model"] for e in layers]
    return rank_correlation(mse, kl)


# --quick: MoFQ on the first four blocks only (28 layers): the model metric costs two forward
# passes of the whole model per layer, too many for all 210 layers on a shared 2-core machine


def _first_blocks(n: int) -> tuple[str, ...]:
    """Targets: every linear of blocks 0..n-1."""
    return (r"re:model\.layers\.(" + "|".join(str(i) for i in range(n)) + r")\..*",)


def mofq_rows(setup: dict[str, Any]) -> list[dict[str, Any]]:
    quick, blocks = setup["quick"], setup["mofq_blocks"]
    search = {"search_samples": 1 if quick else 4}
    targets = {"targets": _first_blocks(blocks)} if blocks else {}
    out = []
    fp4 = dataclasses.replace(W4_G64, format="fp4_e2m1")
    fp8 = dataclasses.replace(W8_CH, format="fp8_e4m3")
    fp8_a = dataclasses.replace(A8_TOKEN_SYM, format="fp8_e4m3")
    setups = (
        ("W4A16", Scheme(weights=W4_G64, **targets), Scheme(weights=fp4, **targets)),
        (
            "W8A8",
            Scheme(weights=W8_CH, input_activations=A8_TOKEN_SYM, **targets),
            Scheme(weights=fp8, input_activations=fp8_a, **targets),
        ),
    )
    for label, int_scheme, fp_scheme in setups:
        where = f" blocks 0-{blocks - 1}" if blocks else ""
        mofq_name = f"{label.lower()}-mofq{where}"
        for name, scheme in ((f"all-INT {label}{where}", int_scheme), (f"all-FP {label}{where}", fp_scheme)):
            numbers, _, seconds = _run(setup, Recipe(scheme, (Step("rtn"),), name))
            out.append(_row("MoFQ", name, mofq_name, numbers, f"{seconds:.0f} s"))
        for metric in ("tensor", "layer", "model"):
            params = {"metric": metric, **(search if metric == "model" else {})}
            recipe = Recipe(int_scheme, (Step("mofq", params),), f"{mofq_name} ({metric})")
            numbers, report, seconds = _run(setup, recipe)
            extra = f"{_fp_count(report)}; {seconds:.0f} s"
            if metric == "model":
                extra += f"; Spearman(tensor-MSE adv, model-KL adv) = {_spearman(report):+.2f}"
            out.append(_row("MoFQ", f"{mofq_name} ({metric})", None, numbers, extra))
    return out


def rows(
    quick: bool,
    sizes: tuple[int, int, int, int] | None = None,
    mofq_blocks: int | None = None,
    rptq_weights: str = "gptq",
) -> list[dict[str, Any]]:
    setup = _setup(quick, sizes, mofq_blocks, rptq_weights)
    return rptq_rows(setup) + recon_rows(setup) + mofq_rows(setup)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer calibration and evaluation tokens, RTN weights")
    ap.add_argument("--only", choices=("rptq", "recon", "mofq"), help="one part of the table")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.only:
        setup = _setup(args.quick)
        table = {"rptq": rptq_rows, "recon": recon_rows, "mofq": mofq_rows}[args.only](setup)
    else:
        table = rows(args.quick)
    print(format_table(table, COLUMNS))  # type: ignore[arg-type]
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
