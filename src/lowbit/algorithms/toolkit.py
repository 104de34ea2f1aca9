"""Machinery several methods share, so that no method imports another.

- ``InputStats``: per-column input ranges (and a row sample) of a linear, collected in a pass;
- smoothing sites (``smoothing_sites``, ``transform_sites``) and the smoothing search loss
  (``smoothing_loss``), used by SmoothQuant, SmoothQuant+, AWQ and OS+;
- ``input_groups``: a block's weight-quantized linears grouped by shared input, in the order the
  block computes them (GPTQ, OWQ, AWQ);
- ``FALLBACKS``: report keys a quantizer sets when it fell back to another method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit import dist
from lowbit.algorithms.base import BlockContext
from lowbit.errors import LowbitError
from lowbit.kvcache import kv_paused
from lowbit.modules import ActQuantizer
from lowbit.qweight import quantize_weight, spec_observer
from lowbit.scheme import QuantSpec
from lowbit.smoothing import SmoothSite, check_pre_norm, smooth_site

PAIRS = ("norms", "all")

# A layer's report entry holds floats; a fallback is flagged by one of these keys, and the pipeline
# turns it into the layer's ``fallback`` text and a run warning.
FALLBACKS = {"fallback_rtn_zero_hessian": "rtn (Hessian is all zero: the layer saw no input)"}


def input_groups(ctx: BlockContext) -> list[list[str]]:
    """Weight-quantized targets grouped by shared input, in the order the block computes them."""
    names = [n for n in ctx.targets if ctx.specs[n][0] is not None]
    groups: list[list[str]] = []
    placed: set[str] = set()
    for seq in ctx.arch.sequential:
        group = [n for n in seq if n in names]
        if group:
            groups.append(group)
            placed.update(group)
    groups.extend([n] for n in names if n not in placed)
    return groups


class InputStats:
    """Per-column min and max of a linear's input over all calibration tokens, plus (with
    ``keep_rows`` > 0) a seeded uniform sample of at most ``keep_rows`` token rows."""

    def __init__(self, keep_rows: int = 0, seed: int = 0) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.keep_rows = keep_rows
        self.rows: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if rows.shape[0] == 0:
            return
        lo, hi = rows.amin(0), rows.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.keep_rows > 0:
            self._sample(rows)

    def _sample(self, rows: torch.Tensor) -> None:
        """Keep the rows with the ``keep_rows`` smallest random keys (all of them while they fit)."""
        keys = torch.rand(rows.shape[0], generator=self._gen, dtype=torch.float64).to(rows.device)
        if self.rows is not None and self._keys is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self._keys, keys])
        if rows.shape[0] > self.keep_rows:
            keys, idx = torch.topk(keys, self.keep_rows, largest=False, sorted=False)
            rows = rows[idx]
        self.rows, self._keys = rows, keys

    def reduce(self) -> None:
        """Combine the column ranges of every data-parallel worker (a collective; a no-op in one
        process). The row sample stays this worker's own."""
        if dist.world() == 1:
            return
        if self.lo is None or self.hi is None:
            raise LowbitError("a data-parallel worker saw no calibration input; give more samples than workers")
        dist.all_reduce_min_(self.lo)
        dist.all_reduce_max_(self.hi)

    def absmax(self) -> torch.Tensor:
        """Per-column max |x| (in,)."""
        if self.lo is None or self.hi is None:
            raise LowbitError("smoothquant: a smoothed layer saw no calibration input")
        return torch.maximum(self.lo.abs(), self.hi.abs())


def fake_act(xs: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``xs`` fake-quantized as the pipeline will: a static range from the spec's observer
    (min-max: exactly the range over all calibration tokens, from the per-column ``lo``/``hi``
    of ``xs``; other observers: on the sampled rows), or dynamic at run time."""
    act = ActQuantizer(spec)
    if not spec.dynamic:
        if spec.observer == "minmax":
            act.set_range(lo.min(), hi.max())
        else:
            observer = spec_observer(spec)
            observer.update(xs)
            act.set_range(*observer.range())
    return act(xs)


def smoothing_loss(
    x: torch.Tensor,
    stats: InputStats,
    linears: list[nn.Linear],
    specs: list[tuple[QuantSpec | None, QuantSpec | None]],
    s_cols: torch.Tensor,
    refs: list[torch.Tensor] | None = None,
) -> float:
    """``sum_c ||Q_a(x / s) Q_w(W_c * s)ᵀ - x W_cᵀ||²`` on the rows ``x`` (n, in).

    ``s_cols``: the scale per input column; ``specs``: each consumer's (weights,
    input_activations) spec (``None``: stays float). ``refs``: the float outputs ``x W_cᵀ`` if
    already computed (they do not depend on ``s``).
    """
    assert stats.lo is not None and stats.hi is not None
    s_cols = s_cols.to(x.device, torch.float32)
    xs = x / s_cols
    lo, hi = stats.lo / s_cols, stats.hi / s_cols
    total = 0.0
    for i, (lin, (wspec, aspec)) in enumerate(zip(linears, specs, strict=True)):
        w = lin.weight.detach().float()
        ref = refs[i] if refs is not None else x @ w.T
        ws = w * s_cols
        wq = quantize_weight(ws, wspec).dequantize().to(ws.device) if wspec is not None else ws
        xq = fake_act(xs, aspec, lo, hi) if aspec is not None else xs
        total += float((xq @ wq.T - ref).double().pow(2).sum())
    return total


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None  # smooth_site reports it


def smoothing_sites(ctx: BlockContext, helps: Callable[[str], bool], pairs: str) -> list[SmoothSite]:
    """The block's smoothing pairs (``ctx.arch.smooth``) with a consumer that ``helps`` accepts, in
    the order the block computes them; ``pairs="norms"`` leaves out pairs after a linear (v -> o,
    up -> down). Refuses post-norm blocks when any pair is found."""
    sites = []
    for prev, consumers in ctx.arch.smooth:
        if not any(helps(c) for c in consumers):
            continue
        if pairs == "norms" and isinstance(_submodule(ctx.block, prev), nn.Linear):
            continue  # v -> o and up -> down only with pairs="all"
        sites.append(smooth_site(ctx.block, ctx.arch, prev, consumers))
    if sites:
        check_pre_norm(ctx.block, ctx.arch)
    return sites


def transform_sites(
    ctx: BlockContext, sites: list[SmoothSite], keep_rows: int, transform: Callable[[SmoothSite, InputStats], None]
) -> None:
    """Collect every pair's input statistics (``keep_rows`` sampled rows each) in one float pass,
    then call ``transform`` on the pairs from last to first, so a pair's weights are final when
    its scale is computed (every fold is exact: no fold changes another pair's input)."""
    if not sites:
        return
    observed = {site.observe: InputStats(keep_rows) for site in sites}
    # the pipeline pauses the KV quantizer around transforms; called directly, do it here too
    with kv_paused(getattr(ctx.block.get_submodule(ctx.arch.attention), "lowbit_kv", None)):
        ctx.feed_inputs({ctx.block.get_submodule(name): stats for name, stats in observed.items()})
    for stats in observed.values():
        stats.reduce()
    for site in reversed(sites):
        transform(site, observed[site.observe])
