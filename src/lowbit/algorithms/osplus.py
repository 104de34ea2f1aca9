"""Outlier Suppression+ (Wei et al., 2023) as a recipe transform: shift and scale activation channels.

Activation outliers in LLMs are asymmetric (a channel lives around a large offset) and
concentrated in a few channels. For each smoothing pair of the block (``Arch.smooth``: an op
and the linears reading its output) OS+ rewrites the consumers' shared input ``X`` as

    X̃ = (X - z) / s,    W' = W diag(s),    b' = b + W z

so the block computes the same function while every channel of ``X̃`` is centred and no
wider than a threshold ``t``:

- shift ``z_j = (max_j + min_j) / 2`` over the calibration tokens centres channel ``j``, so a
  symmetric range covers half of what it needed before;
- scale ``s_j = max(1, max|X̃_j| / t)`` brings the channels wider than ``t`` down to it and
  leaves the others alone; ``t`` is searched on a geometric grid from the widest channel's
  range (no scaling) down to the median channel range, ``grid + 1`` candidates, minimising the
  consumers' quantized output error ``sum_c ||Q_a(X̃) Q_w(W_c diag(s))ᵀ - X̃ (W_c diag(s))ᵀ||²``
  on up to ``n_rows`` sampled calibration rows, with the consumers' own specs (weights RTN,
  activations as the pipeline's ``ActQuantizer`` with a static range from the spec's observer,
  or dynamic). The shifted bias ``b + W z`` stays in float, so ``X̃ W'ᵀ`` is the reference.

Where the shift can be folded exactly (``lowbit.smoothing.can_shift``): a LayerNorm with a
bias absorbs ``-z`` in its bias (OPT), and v_proj absorbs it in its bias (one is added where
v_proj has none) because softmax weights sum to 1, so the attention output moves by exactly
``-z``, per value channel (grouped-query attention: ``z`` is per value channel, the midpoint of
the union of the ranges of the o_proj columns that read it). RMSNorm (Llama, Qwen, Gemma) has
no bias and down_proj reads ``act(gate) * up``, which a shift of ``up`` does not move by a
constant: those pairs are scaled only (``z = 0``, ``osplus_shifted`` 0 in the stats).
``shift=False`` scales every pair without shifting.

Consumers and v_proj may gain a bias the original model did not have; ``lowbit.checkpoint``
saves and loads it with the rest. The v -> o shift and scale change the values stored in the
KV cache (centred and narrowed); with a quantized KV cache that changes what is quantized there
(the search loss does not model it).

Which pairs, and in what order: as SmoothQuant (``lowbit.algorithms.smoothquant``), a pair is
transformed only if one of its consumers is a target with quantized input activations (the
shift and scale serve activation quantization; weight-only schemes are left alone); all pairs'
statistics come from one float pass (every fold is exact, so no fold changes another pair's
input), and pairs are folded from last to first so each search sees its consumers' final weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import PAIRS, InputStats, smoothing_loss, smoothing_sites, transform_sites
from lowbit.smoothing import SmoothSite, can_shift, fold_scales, fold_shift


def _reduce(per_column: torch.Tensor, site: SmoothSite, how: str) -> torch.Tensor:
    """Per consumer column (in,) -> per entry of ``z``/``s`` (width,), by ``how`` ("amax"/"amin") over the
    columns sharing an entry (grouped-query v -> o)."""
    if site.index is None:
        return per_column
    out = torch.empty(site.width, dtype=per_column.dtype, device=per_column.device)
    return out.scatter_reduce(0, site.index.to(per_column.device), per_column, reduce=how, include_self=False)


def thresholds(ranges: torch.Tensor, grid: int) -> list[float]:
    """Candidate outlier thresholds ``t_i = r_max (r_med / r_max)^(i / grid)``, i = 0 .. grid.

    ``ranges``: per-channel ``max|X̃_j|``; ``r_max`` and ``r_med`` are the largest and the median
    positive range. ``t_0 = r_max`` scales nothing, so the search never does worse than no
    scaling on its loss; the last candidate brings every channel above the median to it. Empty
    when no channel is non-zero.
    """
    positive = ranges[ranges > 0].double()
    if positive.numel() == 0:
        return []
    r_max, r_med = float(positive.max()), float(positive.median())
    return [r_max * (r_med / r_max) ** (i / grid) for i in range(grid + 1)]


def osplus_scales(ranges: torch.Tensor, t: float) -> torch.Tensor:
    """``s_j = max(1, ranges_j / t)``: channels wider than ``t`` narrowed to it, the rest unchanged."""
    return (ranges.float() / t).clamp(min=1.0)


@register("osplus", kind="transform")
@dataclass
class OutlierSuppressionPlus(Algorithm):
    """Outlier Suppression+: channel-wise shift (where exact) and scaling with a searched
    threshold. ``grid``: the threshold grid has ``grid + 1`` points; ``n_rows``: calibration
    rows sampled per pair for the search loss; ``shift``: centre channels where the shift folds
    exactly (off: scale only); ``pairs``: ``"norms"`` (norm -> linears) or ``"all"`` (also
    v_proj -> o_proj and up_proj -> down_proj)."""

    grid: int = 20
    n_rows: int = 4096
    shift: bool = True
    pairs: str = "all"

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be an integer >= 1 (grid + 1 candidate thresholds), got {self.grid!r}")
        if isinstance(self.n_rows, bool) or not isinstance(self.n_rows, int) or self.n_rows < 1:
            raise ValueError(f"n_rows must be an integer >= 1 (calibration rows for the search), got {self.n_rows!r}")
        if not isinstance(self.shift, bool):
            raise ValueError(f"shift must be true or false, got {self.shift!r}")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {list(PAIRS)}, got {self.pairs!r}")

    def apply(self, ctx: BlockContext) -> None:
        transform_sites(ctx, self.sites(ctx), self.n_rows, functools.partial(self._suppress, ctx))

    def sites(self, ctx: BlockContext) -> list[SmoothSite]:
        """The block's pairs this step transforms (those with a consumer that has quantized
        activations), in the order the block computes them."""
        return smoothing_sites(ctx, lambda c: c in ctx.targets and ctx.specs[c][1] is not None, self.pairs)

    def _suppress(self, ctx: BlockContext, site: SmoothSite, stats: InputStats) -> None:
        assert stats.lo is not None and stats.hi is not None and stats.rows is not None  # fed by apply
        shifted = self.shift and can_shift(ctx.block, ctx.arch, site.prev)
        if shifted:
            z = (_reduce(stats.hi, site, "amax") + _reduce(stats.lo, site, "amin")) / 2
        else:
            z = torch.zeros(site.width, dtype=stats.lo.dtype, device=stats.lo.device)
        z_cols = site.expand(z)
        centred = InputStats()
        centred.lo, centred.hi = stats.lo - z_cols, stats.hi - z_cols
        x = stats.rows - z_cols
        ranges = site.reduce_max(torch.maximum(centred.lo.abs(), centred.hi.abs()))

        names = [n for n in site.consumers if n in ctx.targets]  # the quantized consumers: the loss's terms
        lins = [ctx.targets[n] for n in names]
        specs = [ctx.specs[n] for n in names]
        refs = [x @ lin.weight.detach().float().T for lin in lins]  # X̃ W'ᵀ = (X - z) Wᵀ whatever s is
        best_t, best_loss, s = 0.0, None, torch.ones_like(ranges, dtype=torch.float32)
        for t in thresholds(ranges, self.grid):
            candidate = osplus_scales(ranges, t)
            loss = smoothing_loss(x, centred, lins, specs, site.expand(candidate), refs)
            if best_loss is None or loss < best_loss:
                best_t, best_loss, s = t, loss, candidate

        if shifted:
            fold_shift(ctx.block, ctx.arch, site.prev, site.consumers, z)
        fold_scales(ctx.block, ctx.arch, site.prev, site.consumers, s)
        record = {
            "osplus_threshold": best_t,
            "osplus_max_scale": float(s.max()),
            "osplus_shifted": 1.0 if shifted else 0.0,
        }
        if best_loss is not None:
            record["osplus_loss"] = best_loss
        for name in site.consumers:
            if name in ctx.targets:
                ctx.stats.setdefault(name, {}).update(record)
