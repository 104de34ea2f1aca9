"""AdaRound's soft weight and regulariser gradient with few passes over the weights (CPU speed).

``rounding.adaround_weight(b, h(V), s, z)`` written with autograd is about twenty elementwise
passes over every weight per step (the rectified sigmoid, the two clips and their backward
masks), and the regulariser as many again. On a CPU, where a block's matmuls on one sequence
take less time than that, these passes were most of a step. The same values here:

- the weights whose lower neighbour ``b`` is ``qmax`` (or ``qmin - 1``) cannot move: their clip
  fixes them at the grid's end, so they go into a constant and drop out of the trained part;
- for the others the clip ``[qmin, qmax]`` is inactive, so ``W~ = c + s * h`` with
  ``c = s * (b - z)``, one pass from a per-step ``h``;
- ``h`` and ``dh/dV = (zeta - gamma) * sigmoid(V) * (1 - sigmoid(V))`` (0 where the rectified
  sigmoid is clipped) are computed once per step (``SoftParts``), not per forward;
- the regulariser's gradient ``-2 * beta * u * |u| ** (beta - 2) * dh/dV`` with ``u = 2h - 1`` is
  added to ``V``'s gradient directly (``add_regularizer_grad``), without building its graph.

``tests/test_softround.py`` checks the weight and both gradients against the autograd reference
(``rounding.adaround_weight`` and ``rounding.rounding_regularizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.algorithms.rounding import GAMMA, ZETA


@dataclass
class SoftGrid:
    """The constant part of a layer's soft weight: ``const`` (out, in), the weight where every
    ``h`` is 0 (and the frozen weights' final value), and ``scale`` (out, in), ``s`` where the
    weight can move and 0 where it cannot."""

    const: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def build(
        cls,
        base: torch.Tensor,
        s: torch.Tensor,
        z: torch.Tensor,
        qmin: int,
        qmax: int,
        outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SoftGrid:
        """From AdaRound's lower neighbours ``base`` (in ``[qmin - 1, qmax]``) and the expanded
        grid; ``outliers`` (column indices, float columns) stay as they are and do not train."""
        free = (base >= qmin) & (base <= qmax - 1)
        const = s * (base.clamp(qmin, qmax) - z)
        scale = torch.where(free, s, torch.zeros_like(s))
        if outliers is not None:
            idx, cols = outliers
            const = const.index_copy(1, idx, cols.to(const.dtype))
            scale = scale.index_fill(1, idx, 0.0)
        return cls(const, scale)


@dataclass
class SoftParts:
    """One step's ``h(V)`` and ``dh/dV`` (both (out, in) float32), for ``V`` at ``version``."""

    h: torch.Tensor
    dh: torch.Tensor
    version: int

    @classmethod
    @torch.no_grad()
    def of(cls, v: torch.Tensor) -> SoftParts:
        sig = torch.sigmoid(v)
        dh = torch.addcmul(sig, sig, sig, value=-1.0).mul_(ZETA - GAMMA)  # (zeta-gamma) sig (1 - sig)
        h = sig.mul_(ZETA - GAMMA).add_(GAMMA).clamp_(0.0, 1.0)
        dh.masked_fill_((h <= 0.0) | (h >= 1.0), 0.0)  # clipped: no gradient (as clamp's, inclusive)
        return cls(h, dh, v._version)


class _SoftWeight(torch.autograd.Function):
    """``const + scale * h`` as a function of ``V``: gradient ``grad * scale * dh``."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, grid: SoftGrid, parts: SoftParts) -> torch.Tensor:
        ctx.grid, ctx.parts = grid, parts
        return torch.addcmul(grid.const, grid.scale, parts.h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return grad * ctx.parts.dh * ctx.grid.scale, None, None


def soft_weight(v: torch.Tensor, grid: SoftGrid, parts: SoftParts) -> torch.Tensor:
    """The soft weight ``s * (clip(b + h(V), qmin, qmax) - z)`` (out, in), differentiable in ``v``."""
    if parts.version != v._version:
        raise RuntimeError("SoftParts are stale: V changed since they were computed")
    return _SoftWeight.apply(v, grid, parts)


@torch.no_grad()
def add_regularizer_grad(v: torch.Tensor, parts: SoftParts, lam: float, beta: float) -> None:
    """Add ``lam * d/dV sum(1 - |2 h(V) - 1| ** beta)`` to ``v.grad`` (``beta >= 1``)."""
    u = parts.h.mul(2.0).sub_(1.0)
    # sign(u) |u|^(beta-1), as u |u|^(beta-2) where beta >= 2 (one pass fewer)
    g = u.abs().pow_(beta - 2.0).mul_(u) if beta >= 2.0 else u.abs().pow_(beta - 1.0).mul_(u.sign())
    g.mul_(parts.dh)
    if v.grad is None:
        v.grad = g.mul_(-2.0 * beta * lam)
    else:
        v.grad.add_(g, alpha=-2.0 * beta * lam)
