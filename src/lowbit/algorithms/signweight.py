"""SignRound's weight with few passes over the weights (CPU speed), as ``softround.py`` does for
AdaRound.

``rounding.signround_weight`` written with autograd gathers each group's scale and zero point to
every weight, builds the straight-through round and the clip as separate ops, and its backward
scatters the scale's gradient back over the groups: on a SmolLM2-shaped block the weights'
forward and backward took 68 ms of a 137 ms step (one 512-token sequence, 2 threads), more than
the block's own matmuls. Here the same values and gradients:

- with contiguous groups (``g_idx = arange(in) // group_size``, every preset's layout) the
  weights are viewed as (out, G, group) and the per-group scale and zero point broadcast, with
  no gathered copies; other layouts (act-order) gather and scatter with ``g_idx``;
- ``q = clip(round(w / s + V) + z, qmin, qmax)`` and the clip's mask are computed once in the
  forward and kept for the backward, which gives ``dW~/dV = s m`` and
  ``dW~/ds = (q - z) - m w / s`` (``m``: the clip is inactive, inclusive like ``clamp``'s; the
  round is straight-through), summed per group for ``s``. The zero point is rounded (asymmetric)
  or constant (symmetric), so its gradient is zero in the autograd formulation too: none is given.

``tests/test_signround.py`` checks the value and the gradients of ``V`` and of the clipping
factors (through the scale) against ``rounding.signround_weight`` on both layouts, clipped
weights included.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.primitives import group_index


def contiguous_groups(g_idx: torch.Tensor) -> int | None:
    """The group size when ``g_idx`` is ``arange(in) // group_size`` with whole groups, else None."""
    n = g_idx.numel()
    groups = int(g_idx.max()) + 1 if n else 0
    if groups == 0 or n % groups:
        return None
    size = n // groups
    return size if torch.equal(g_idx.to("cpu", torch.int64), group_index(n, size)) else None


class _SignWeight(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        v: torch.Tensor,
        scale: torch.Tensor,
        zp: torch.Tensor,
        w: torch.Tensor,
        g_idx: torch.Tensor,
        group: int | None,
        qmin: int,
        qmax: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, inp = w.shape
        if group is not None:  # (out, G, group) views, per-group values broadcast
            s, z = scale[:, :, None], zp[:, :, None]
            w3, v3 = w.view(out, -1, group), v.view(out, -1, group)
        else:
            s, z = scale[:, g_idx], zp[:, g_idx]
            w3, v3 = w, v
        raw = torch.addcdiv(v3, w3, s).round_().add_(z)  # round(w / s + V) + z
        inside = (raw >= qmin) & (raw <= qmax)
        q = raw.clamp_(qmin, qmax)
        weight = (q - z).mul_(s)
        ctx.save_for_backward(w3, s, z, q, inside, g_idx)
        ctx.group, ctx.shape, ctx.groups = group, (out, inp), scale.shape[1]
        q_out = q.reshape(out, inp)
        ctx.mark_non_differentiable(q_out)
        return weight.reshape(out, inp), q_out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_q: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w3, s, z, q, inside, g_idx = ctx.saved_tensors
        out, inp = ctx.shape
        g = grad.reshape(w3.shape)
        mask = inside.to(g.dtype)
        grad_v = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_v = (g * s * mask).reshape(out, inp)
        if ctx.needs_input_grad[1]:
            per_weight = g * ((q - z) - mask * w3 / s)
            # (out, G); a per-tensor (1, 1) scale gets it summed over the rows by autograd (sum_to)
            grad_s = _per_group(per_weight, ctx.group, g_idx, ctx.groups)
        # the zero point comes out of a round (or is a constant): its gradient is zero either way
        return grad_v, grad_s, None, None, None, None, None, None


def _per_group(t: torch.Tensor, group: int | None, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum ``t`` (out, G, group) or (out, in) over each group's columns: (out, G)."""
    if group is not None:
        return t.sum(-1)
    return torch.zeros(t.shape[0], groups, dtype=t.dtype, device=t.device).index_add_(1, g_idx, t)


def sign_weight(
    w: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    g_idx: torch.Tensor,
    qmin: int,
    qmax: int,
    group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounding.signround_weight``'s ``(s * (q - z), q)`` in few passes; ``group``: the size of
    contiguous groups (``contiguous_groups(g_idx)``), None for any ``g_idx``."""
    weight, q = _SignWeight.apply(v, scale, zp, w, g_idx, group, qmin, qmax)
    return weight, q
