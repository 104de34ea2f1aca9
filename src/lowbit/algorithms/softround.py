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

``SoftRounding`` holds one layer's rounding variables on its fixed grid (soft for training, hard
for the result) and ``adam`` the optimizer over them; both AdaRound targets (``adaround.py``,
``adaround_layer.py``) train through them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.algorithms.rounding import (
    GAMMA,
    ZETA,
    adaround_codes,
    adaround_start,
    adaround_weight,
    expanded_grid,
    rectified_sigmoid,
    rounding_regularizer,
)
from lowbit.formats import IntFormat
from lowbit.qweight import QuantizedWeight


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


class SoftRounding:
    """One layer's rounding variables on a fixed grid. ``mode``: "soft" (``h(V)``, training) or
    "hard" (``h(V) >= 0.5``, the result)."""

    def __init__(self, w: torch.Tensor, qw: QuantizedWeight, init: str = "codes") -> None:
        device = w.device
        self.qw = qw
        base, v0 = adaround_start(w.to(device), qw.to(device), init)  # refuses float grids
        fmt = qw.spec.fmt
        assert isinstance(fmt, IntFormat)
        self.qmin, self.qmax = fmt.qmin, fmt.qmax
        self.base, self.v0 = base, v0
        self.v = v0.clone().requires_grad_(True)
        self.s, self.z = (t.to(device) for t in expanded_grid(qw))
        self.outliers = None
        if qw.outlier_idx is not None and qw.outlier_weight is not None:
            self.outliers = (qw.outlier_idx.to(device), qw.outlier_weight.to(device, torch.float32))
        self.grid = SoftGrid.build(base, self.s, self.z, self.qmin, self.qmax, self.outliers)
        self._parts: SoftParts | None = None
        self.mode = "soft"

    def parts(self) -> SoftParts:
        """``h(V)`` and ``dh/dV`` for the current ``V``: recomputed after each step of ``adam``'s
        optimizer (``forget_parts``) and whenever ``V``'s version changed."""
        if self._parts is None or self._parts.version != self.v._version:
            self._parts = SoftParts.of(self.v)
        return self._parts

    def forget_parts(self) -> None:
        """Drop the per-step ``h(V)``: ``V`` changed (an optimizer step)."""
        self._parts = None

    def weight(self) -> torch.Tensor:
        """The current weight (out, in) float32, differentiable in ``v`` in soft mode."""
        if self.mode == "soft":  # the same values in few passes (softround.py)
            return soft_weight(self.v, self.grid, self.parts())
        with torch.no_grad():
            h = (rectified_sigmoid(self.v) >= 0.5).to(torch.float32)
        w = adaround_weight(self.base, h, self.s, self.z, self.qmin, self.qmax)
        if self.outliers is not None:  # OWQ's float columns stay as they are
            w = w.index_copy(1, self.outliers[0], self.outliers[1])
        return w

    def regularizer(self, beta: float) -> torch.Tensor:
        """The regulariser's value (a 0-d tensor, differentiable in ``v``)."""
        return rounding_regularizer(rectified_sigmoid(self.v), beta)

    def add_regularizer_grad(self, lam: float, beta: float) -> None:
        """Add ``lam`` times the regulariser's gradient to ``v.grad`` (no graph)."""
        add_regularizer_grad(self.v, self.parts(), lam, beta)

    def result(self) -> QuantizedWeight:
        """The start's grid with the learned hard rounding as its codes."""
        with torch.no_grad():
            q = adaround_codes(self.base, self.v, self.qmin, self.qmax)
        codes = self.qw.spec.fmt.to_codes(q).to(self.qw.codes.device)
        return dataclasses.replace(self.qw, codes=codes)

    def flipped(self) -> float:
        with torch.no_grad():
            start = adaround_codes(self.base, self.v0, self.qmin, self.qmax)
            end = adaround_codes(self.base, self.v, self.qmin, self.qmax)
        return float((start != end).float().mean())


def reference_loss(loss_start: float) -> float:
    """What the reconstruction loss is divided by in training: the start's loss (so ``lam`` weighs
    the regulariser against the relative error), or 1 when the start is exact."""
    return loss_start if loss_start > 0 and loss_start < float("inf") else 1.0


def adam(rounders: list[SoftRounding], lr: float) -> torch.optim.Adam:
    """Adam on the rounders' ``V``, its fused single-pass kernel where the device has one (CPU,
    CUDA: otherwise an update is several passes over every weight of the block). Each step
    drops the rounders' per-step ``h(V)`` (the fused kernel does not bump ``V``'s version)."""
    params = [r.v for r in rounders]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.Adam(params, lr=lr, fused=fused)

    def stale(*_: object) -> None:
        for r in rounders:
            r.forget_parts()

    optimizer.register_step_post_hook(stale)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
