"""GPTQ against RTN on the real demo model (see ``test_integration.py``), in a file of their own so that
another test worker runs the other demo tests beside them (``test_integration_owq.py``: OWQ)."""

from __future__ import annotations

from typing import Any

import pytest
from demo_support import demo_setup, g64, run

from lowbit import api
from lowbit.scheme import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return demo_setup()


@pytest.fixture(scope="module")
def gptq_runs(demo: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """(perplexity change, KL, bits per weight) of GPTQ and RTN on the same calibration set."""
    calib = api.calibration_samples(demo["tok"], "demo", n_samples=8, seq_len=256, seed=0)
    recipes: dict[str, str | Recipe] = {
        "w4 rtn": g64("w4a16", "rtn"),
        "w4 gptq": g64("w4a16"),
        "w3 rtn": g64("w3a16", "rtn"),
        "w3 gptq": g64("w3a16"),
    }
    out = {}
    for name, recipe in recipes.items():
        res, model = run(demo, recipe, calib)
        assert res.baseline_perplexity is not None and res.kl is not None
        out[name] = (res.perplexity / res.baseline_perplexity - 1, res.kl, api.bits_per_weight(model))
    return out


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
