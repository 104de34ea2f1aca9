"""AdaRound's few-pass soft weight and regulariser gradient (``softround.py``) against the
autograd reference of ``rounding.py``: same weight, same gradient in ``V`` (including the
weights clipped at the grid's ends, the clipped rectified sigmoid and OWQ's float columns),
and a refusal of stale per-step parts."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.rounding import adaround_weight, rectified_sigmoid, rounding_regularizer
from lowbit.algorithms.softround import SoftGrid, SoftParts, add_regularizer_grad, soft_weight

QMIN, QMAX = -8, 7


def _case(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shape = (24, 40)
    base = torch.randint(QMIN - 1, QMAX + 1, shape, generator=gen).float()  # includes qmin-1 and qmax
    v = torch.randn(shape, generator=gen) * 3.0  # many beyond the clip of h (|V| > 2.4)
    s = torch.rand(shape, generator=gen) * 0.1 + 0.01
    z = torch.randint(-2, 3, shape, generator=gen).float()
    return base, v, s, z


def _reference(
    base: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    w = adaround_weight(base, rectified_sigmoid(v), s, z, QMIN, QMAX)
    if outliers is not None:
        w = w.index_copy(1, outliers[0], outliers[1])
    return w


@pytest.mark.parametrize("with_outliers", [False, True])
def test_soft_weight_and_its_gradient_equal_autograd(with_outliers: bool) -> None:
    base, v, s, z = _case()
    outliers = (torch.tensor([3, 17]), torch.randn(24, 2)) if with_outliers else None
    assert bool(((base == QMAX) | (base == QMIN - 1)).any())  # frozen weights are in the case
    assert bool((rectified_sigmoid(v) == 0).any()) and bool((rectified_sigmoid(v) == 1).any())
    probe = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))

    ref_v = v.clone().requires_grad_(True)
    ref = _reference(base, ref_v, s, z, outliers)
    (ref * probe).sum().backward()

    got_v = v.clone().requires_grad_(True)
    grid = SoftGrid.build(base, s, z, QMIN, QMAX, outliers)
    got = soft_weight(got_v, grid, SoftParts.of(got_v))
    (got * probe).sum().backward()

    assert torch.allclose(got, ref.detach(), rtol=1e-6, atol=1e-7)
    assert ref_v.grad is not None and got_v.grad is not None
    assert torch.allclose(got_v.grad, ref_v.grad, rtol=1e-5, atol=1e-8)
    assert bool((ref_v.grad != 0).any()) and bool((ref_v.grad == 0).any())


@pytest.mark.parametrize("beta", [20.0, 7.3, 2.0, 1.5])
def test_regularizer_gradient_equals_autograd(beta: float) -> None:
    _, v, _, _ = _case(2)
    v = v * 0.5  # mostly inside the clip, some outside
    lam = 0.03
    ref_v = v.clone().requires_grad_(True)
    (lam * rounding_regularizer(rectified_sigmoid(ref_v), beta)).backward()
    got_v = v.clone().requires_grad_(True)
    add_regularizer_grad(got_v, SoftParts.of(got_v), lam, beta)
    assert ref_v.grad is not None and got_v.grad is not None
    assert torch.allclose(got_v.grad, ref_v.grad, rtol=1e-5, atol=1e-9)
    # added to an existing gradient, not replacing it
    before = torch.ones_like(v)
    got_v.grad = before.clone()
    add_regularizer_grad(got_v, SoftParts.of(got_v), lam, beta)
    assert torch.allclose(got_v.grad, before + ref_v.grad, rtol=1e-5, atol=1e-7)


def test_stale_parts_are_refused() -> None:
    base, v, s, z = _case()
    v = v.clone().requires_grad_(True)
    grid = SoftGrid.build(base, s, z, QMIN, QMAX)
    parts = SoftParts.of(v)
    with torch.no_grad():
        v.add_(0.1)  # an optimizer step
    with pytest.raises(RuntimeError, match="stale"):
        soft_weight(v, grid, parts)
