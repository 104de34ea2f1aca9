"""Numerics of learned rounding, as small pure functions (AdaRound, SignRound).

AdaRound (Nagel et al., 2020): a weight on a fixed grid is ``s * (clip(b + h(V), qmin, qmax) - z)``
with ``b`` the grid point below it and ``h`` the rectified sigmoid, trained towards 0 or 1 by a
regulariser whose exponent ``beta`` is annealed; the result is ``b + (h(V) >= 0.5)``.

SignRound (Cheng et al., 2023): ``s * (clip(round(W / s + V) + z, qmin, qmax) - z)`` with offsets
``V`` in [-0.5, 0.5] and ``s``, ``z`` from the group's range scaled by clipping factors.

Shapes: weights, offsets and grid tensors are (out, in); per-group tensors (out, G) are expanded
to columns with ``g_idx`` (in,) as in ``QuantizedWeight``.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat
from lowbit.primitives import qparams
from lowbit.qweight import QuantizedWeight

ZETA = 1.1  # stretch of the rectified sigmoid (Louizos et al., 2018; AdaRound's values)
GAMMA = -0.1
# AdaRound's start puts h(V) on the initial rounding's side of 0.5 by at least this much, so the
# hard rounding of the start is the initial rounding exactly (see ``adaround_start``)
SIDE_MARGIN = 0.01


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, elementwise."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in [0, 1]: ``-log((zeta - gamma) / (h - gamma) - 1)``."""
    h = h.to(torch.float32).clamp(0.0, 1.0)
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2 h - 1| ** beta)`` (a 0-d tensor): 0 when every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


LR_SCHEDULES = ("constant", "linear")


def lr_at(step: int, iters: int, lr: float, schedule: str = "constant") -> float:
    """The learning rate of ``step`` (0-based) of ``iters``: ``lr`` throughout ("constant"), or
    decaying linearly from ``lr`` at step 0 towards 0 ("linear": ``lr * (1 - step / iters)``,
    auto-round's schedule), so that the last steps, where the regulariser pushes ``h`` to 0 or 1,
    move ``V`` less."""
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1.0 - step / max(iters, 1))
    raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")


def beta_schedule(step: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's exponent at ``step`` (0-based) of ``iters``: None (no regulariser) during
    the first ``warmup`` fraction, then decaying linearly from ``start`` to ``end``:
    ``end + (start - end) * (1 - (step - w) / (iters - w))`` with ``w = warmup * iters``."""
    first = warmup * iters
    if step < first:
        return None
    rel = (step - first) / max(iters - first, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - rel)


def _int_format(qw: QuantizedWeight) -> IntFormat:
    fmt = qw.spec.fmt
    if not isinstance(fmt, IntFormat):
        raise LowbitError(f"learned rounding needs an integer weight grid, not {fmt.name}; use an int/uint format")
    return fmt


def expanded_grid(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per weight, (out, in) float32 each."""
    return qw.scale.to(torch.float32)[:, qw.g_idx], qw.zero_point.to(torch.float32)[:, qw.g_idx]


INITS = ("codes", "fraction")
# the "codes" start: h(V) this far from the initial code's side (0 or 1), inside the clip so that
# gradients flow; 0.05 kept GPTQ's joint decisions and still let the learner move (see adaround.py)
CODES_MARGIN = 0.05


def adaround_start(w: torch.Tensor, qw: QuantizedWeight, init: str = "codes") -> tuple[torch.Tensor, torch.Tensor]:
    """AdaRound's ``(b, V0)`` on ``qw``'s grid for the float weight ``w`` (out, in), starting from
    ``qw``'s codes ``q`` (RTN's, or GPTQ's).

    ``b`` is the grid point below ``w / s + z`` (the paper's floor), moved to ``q - 1`` or ``q``
    where ``q`` is not one of the two neighbours of ``w`` (GPTQ's error feedback can move a code
    further): the learner then chooses between ``q`` and its neighbour nearest ``w``.

    ``init="fraction"`` (the paper): ``h(V0)`` is the fractional part ``w / s + z - b`` (the soft
    weight equals the float weight), except where that would round the other way than ``q``:
    there ``h(V0)`` sits just (``SIDE_MARGIN``) on ``q``'s side of 0.5. ``init="codes"``:
    ``h(V0)`` is ``CODES_MARGIN`` or ``1 - CODES_MARGIN`` on ``q``'s side, so the soft start is
    (nearly) the quantizer's result itself. Either way the start's hard rounding is exactly ``q``.
    """
    if init not in INITS:
        raise LowbitError(f"adaround init must be one of {list(INITS)}, got {init!r}")
    _int_format(qw)  # refuses float grids
    s, z = expanded_grid(qw)
    q = qw.grid_values().to(torch.float32)
    t = w.detach().to(torch.float32) / s + z
    base = torch.minimum(torch.maximum(torch.floor(t), q - 1.0), q)
    up = q - base > 0.5  # the initial code is the upper neighbour
    if init == "codes":
        h0 = torch.where(up, 1.0 - CODES_MARGIN, CODES_MARGIN)
    else:
        frac = t - base
        h0 = torch.where(up, frac.clamp(0.5 + SIDE_MARGIN, 1.0), frac.clamp(0.0, 0.5 - SIDE_MARGIN))
    return base, inverse_rectified_sigmoid(h0)


def adaround_weight(
    base: torch.Tensor, h: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The soft (or, with ``h`` in {0, 1}, hard) weight ``s * (clip(b + h, qmin, qmax) - z)``."""
    return s * ((base + h).clamp(qmin, qmax) - z)


def adaround_codes(base: torch.Tensor, v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Hard rounding: grid values ``clip(b + (h(V) >= 0.5), qmin, qmax)`` (float32)."""
    return (base + (rectified_sigmoid(v) >= 0.5).to(torch.float32)).clamp(qmin, qmax)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward (half to even), identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``'s value with ``x``'s gradient (``y`` computed from ``x`` without autograd)."""
    return x + (y.to(x.dtype) - x).detach()


def grid_range(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``(lo, hi)`` per group, (out, G) each, that ``qparams`` maps back onto ``qw``'s
    scale and zero point: ``s (qmin - z)``, ``s (qmax - z)`` asymmetric; ``-+ s (qmax - qmin) / 2``
    symmetric (lowbit's symmetric scale is ``max|x| / ((qmax - qmin) / 2)``)."""
    fmt = _int_format(qw)
    s, z = qw.scale.to(torch.float32), qw.zero_point.to(torch.float32)
    if qw.spec.symmetric:
        hi = s * ((fmt.qmax - fmt.qmin) / 2)
        return -hi, hi
    return s * (fmt.qmin - z), s * (fmt.qmax - z)


def clipped_qparams(
    lo: torch.Tensor, hi: torch.Tensor, clip_lo: torch.Tensor, clip_hi: torch.Tensor, qw: QuantizedWeight
) -> tuple[torch.Tensor, torch.Tensor]:
    """SignRound's scale and zero point (out, G) from the range ``(lo * clip_lo, hi * clip_hi)``
    with ``qw``'s format, symmetry and scale dtype; differentiable in the clipping factors (the
    zero point is rounded, so its gradient is zero). Factors of 1 give ``qw``'s own grid back."""
    spec = qw.spec
    scale, zp = qparams(lo * clip_lo, hi * clip_hi, spec.fmt, spec.symmetric, spec.scale_dtype)
    return scale, zp


def signround_weight(
    w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, g_idx: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SignRound's weight and grid values: ``q = clip(round(w / s + V) + z, qmin, qmax)`` with a
    straight-through round, and ``s * (q - z)``; ``scale``/``zp`` per group (out, G)."""
    s, z = scale[:, g_idx], zp[:, g_idx]
    q = (round_ste(w / s + v) + z).clamp(qmin, qmax)
    return s * (q - z), q


def check_fraction(name: str, value: float, low: float, high: float) -> None:
    """A parameter that must lie in ``[low, high]`` (ValueError, which recipes report by step)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
