"""Fake quantization that trains: straight-through estimators, LSQ step sizes and the distillation loss.

Pure tensor functions (no modules, no state) for quantization-aware training (``lowbit.qat``).

Forward: ``fake_quantize(x, scale, zero_point, fmt)`` of :mod:`lowbit.primitives`, bit for bit.
Backward, with ``u = x / scale + zero_point`` (the unrounded grid position):

- **input** (straight-through estimator, Bengio et al. 2013, clipped as in LSQ, Esser et al. 2020,
  eq. 5): the gradient passes unchanged where ``qmin <= u <= qmax`` and is zero outside. Choice:
  the bounds apply to the *unrounded* position, as in the LSQ paper (torch.ao's fake-quantize
  tests the rounded one, which lets half a step more through). For float formats ``qmin, qmax`` is
  ``-max, max`` and ``zero_point`` is 0.
- **scale** (LSQ, Esser et al. 2020, eq. 3): inside, ``round(x / s) - x / s`` (the rounding
  error in steps); below the range ``qmin - zero_point``; above it ``qmax - zero_point``. The zero
  point is an integer and is not learned (LSQ has none; an asymmetric grid keeps the one it
  started with, so its ``Q_N``/``Q_P`` are ``zero_point - qmin`` and ``qmax - zero_point``).
  Multiplied by the gradient scale ``g = 1 / sqrt(N * Q_P)`` (:func:`lsq_grad_factor`, applied with
  :func:`scale_gradient`), ``N`` the number of values that share the step size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats import Format, IntFormat
from lowbit.primitives import _round_scale, fake_quantize


def grid_position(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``u = x / scale + zero_point`` in float32 (broadcasting): where ``x`` falls on the grid, unrounded."""
    return x.to(torch.float32) / scale + zero_point


def in_range(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Bool mask of ``x``'s shape: ``qmin <= x / scale + zero_point <= qmax`` (not clipped)."""
    u = grid_position(x, scale, zero_point)
    return (u >= fmt.qmin) & (u <= fmt.qmax)


def lsq_scale_grad(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per element of ``x`` (float32, broadcast shape): d fake_quantize / d scale as LSQ defines it
    (straight through the rounding): ``round(x/s) - x/s`` inside, ``qmin - zp`` below, ``qmax - zp`` above."""
    v = x.to(torch.float32) / scale
    rounded = fmt.round(v) if not isinstance(fmt, IntFormat) else torch.round(v)
    u = v + zero_point
    inside = rounded - v
    low = torch.as_tensor(fmt.qmin, dtype=torch.float32) - zero_point
    high = torch.as_tensor(fmt.qmax, dtype=torch.float32) - zero_point
    return torch.where(u < fmt.qmin, low.expand_as(u), torch.where(u > fmt.qmax, high.expand_as(u), inside))


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the inverse of broadcasting)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, n in enumerate(shape):
        if n == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
        ctx.fmt = fmt
        ctx.save_for_backward(x, scale, zero_point)
        return fake_quantize(x, scale, zero_point, fmt).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, scale, zero_point = ctx.saved_tensors
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = grad * in_range(x, scale, zero_point, ctx.fmt).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            full = grad.to(torch.float32) * lsq_scale_grad(x, scale, zero_point, ctx.fmt)
            gs = _reduce_to(full, scale.shape).to(scale.dtype)
        return gx, gs, None, None


def ste_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``fake_quantize(x, scale, zero_point, fmt)`` (in ``x``'s dtype) with the module docstring's
    gradients: the clipped straight-through estimator for ``x`` and, when ``scale`` requires a
    gradient, LSQ's for the scale (multiply by :func:`lsq_grad_factor` with :func:`scale_gradient`
    before calling). ``zero_point`` gets none. Broadcasting as ``fake_quantize``."""
    out: torch.Tensor = _FakeQuant.apply(x, scale, zero_point, fmt)
    return out


def lsq_grad_factor(n_shared: int, fmt: Format) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Q_P)``: ``N`` values share the step,
    ``Q_P`` is the format's largest grid value (7 for int4, 15 for uint4, 6 for fp4 e2m1)."""
    return 1.0 / math.sqrt(n_shared * float(fmt.qmax))


def scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` in the forward pass, ``factor * grad`` in the backward pass (LSQ's ``grad_scale``)."""
    scaled = t * factor
    return (t - scaled).detach() + scaled


def stored_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``scale`` as the checkpoint will hold it (rounded to ``scale_dtype``, e.g. float16, never
    <= 0) in the forward pass; the gradient passes to ``scale`` unchanged (straight through)."""
    rounded = _round_scale(scale.detach(), scale_dtype)
    return scale + (rounded - scale).detach()


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        y = fn(x).to(x.dtype)
        return y.clone() if y is x else y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` forward (run without autograd), identity backward: the plain straight-through
    estimator, for quantizers whose range comes from ``x`` itself (dynamic per-token activations)."""
    out: torch.Tensor = _StraightThrough.apply(x, fn)
    return out


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of ``T^2 * KL(p_teacher || p_student)`` on softmax(logits / T), T the
    temperature (Hinton et al. 2015: ``T^2`` keeps the gradient's size independent of T).

    ``student_logits``, ``teacher_logits``: (..., V). Returns a float32 scalar.
    """
    t = float(temperature)
    log_s = F.log_softmax(student_logits.to(torch.float32) / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(torch.float32) / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * (t * t)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``logits`` (B, T, V) at positions 0..T-2 predicting ``ids`` (B, T) at 1..T-1."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).to(torch.float32), ids[:, 1:].reshape(-1))
