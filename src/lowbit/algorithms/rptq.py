"""RPTQ (Yuan et al., "RPTQ: Reorder-based Post-training Quantization for Large Language Models",
2023) as a recipe transform: cluster activation channels and reorder them so each cluster is
contiguous.

For each activation that feeds linears (the block's pairs in ``Arch.smooth``: the norm before
q/k/v, the attention output before o_proj, the norm before gate/up, ``act(gate) * up`` before
down_proj) whose consumers have a static ``cluster`` activation spec:

1. per input channel ``j``, ``(min_j, max_j)`` over every calibration token (one float pass for
   all pairs, before any fold: each fold is exact, so no fold changes another pair's input);
2. K-means on those points into the spec's ``clusters`` clusters (``lowbit.clusters.kmeans``:
   k-means++ initialisation seeded with ``seed``, Lloyd iterations);
3. the channels sorted by cluster (stable) and the permutation folded into the block
   (``lowbit.reorder``: a gather of the norm's output, the producer's rows, the consumers'
   columns; within heads for v -> o);
4. the consumers' clusters, in the new channel order, are handed to the activation quantizers
   (``BlockContext.act_clusters``), which take one scale and zero point per cluster from the
   observe stage's per-channel ranges.

The float block computes the same function afterwards. Choice where the paper leaves it open:
for o_proj the order within each head follows that head's (or, with grouped-query attention,
its group's first head's) clusters, so clusters are contiguous within heads, not across them;
the clusters themselves are computed over all of o_proj's input channels. The KV cache is not
reordered here (keys sit behind RoPE, whose pairs of channels a permutation would break); its
own quantizer handles it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import InputStats, smoothing_sites
from lowbit.clusters import channel_clusters
from lowbit.errors import LowbitError
from lowbit.kvcache import kv_paused
from lowbit.reorder import cluster_order, head_perms, permute_columns, permute_rows, reorder_norm_output
from lowbit.smoothing import SmoothSite


@register("rptq", kind="transform")
@dataclass
class RPTQ(Algorithm):
    """RPTQ's reorder: ``seed`` of the K-means initialisation, ``iters`` its most Lloyd iterations.
    The number of clusters is the consumers' activation spec's ``clusters``."""

    seed: int = 0
    iters: int = 100
    data_parallel = True  # per-channel min / max are all-reduced; K-means is then the same on every worker

    def __post_init__(self) -> None:
        for name in ("seed", "iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "iters" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'iters' else 'non-negative'} integer")

    def apply(self, ctx: BlockContext) -> None:
        sites = smoothing_sites(ctx, functools.partial(_clustered, ctx), "all")
        if not sites:
            return
        observed = {site.observe: InputStats() for site in sites}
        with kv_paused(getattr(ctx.block.get_submodule(ctx.arch.attention), "lowbit_kv", None)):
            ctx.feed_inputs({ctx.block.get_submodule(name): stats for name, stats in observed.items()})
        for stats in observed.values():
            stats.reduce()
        for site in sites:
            self._reorder(ctx, site, observed[site.observe])

    def _reorder(self, ctx: BlockContext, site: SmoothSite, stats: InputStats) -> None:
        if stats.lo is None or stats.hi is None:
            raise LowbitError(f"{ctx.prefix}.{site.observe}: rptq saw no calibration input")
        k = next(k for c in site.consumers if (k := _clusters(ctx, c)) is not None)
        labels = channel_clusters(stats.lo, stats.hi, k, self.seed, self.iters)
        consumers = [_linear(ctx, c) for c in site.consumers]
        prev = ctx.block.get_submodule(site.prev)
        if not isinstance(prev, nn.Linear):  # a norm
            cols = cluster_order(labels)
            reorder_norm_output(ctx.block, site.prev, consumers, cols)
        elif site.prev.startswith(f"{ctx.arch.attention}."):  # v_proj -> o_proj: within heads
            config: Any = getattr(ctx.block.get_submodule(ctx.arch.attention), "config", None)
            if config is None:
                raise LowbitError(f"{ctx.arch.attention} has no .config to read head counts from")
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
            rows, cols = head_perms(labels, heads, kv_heads, head_dim)
            permute_rows(prev, rows)
            for lin in consumers:
                permute_columns(lin, cols)
        else:  # up_proj -> down_proj: gate_proj's rows move with up_proj's
            cols = cluster_order(labels)
            for lin in [prev, *_partners(ctx, site.prev)]:
                permute_rows(lin, cols)
            for lin in consumers:
                permute_columns(lin, cols)
        new_labels = labels[cols]
        contiguous = float(bool((new_labels[1:] >= new_labels[:-1]).all()))
        for c in site.consumers:
            ctx.act_clusters[c] = new_labels
            ctx.stats.setdefault(c, {}).update({"rptq_clusters": float(int(labels.max()) + 1)})
            ctx.stats[c]["rptq_contiguous"] = contiguous


def _clusters(ctx: BlockContext, name: str) -> int | None:
    """The number of clusters of target ``name``'s input activations (None: not per cluster)."""
    aspec = ctx.specs[name][1] if name in ctx.specs else None
    return aspec.clusters if aspec is not None and aspec.granularity == "cluster" else None


def _clustered(ctx: BlockContext, name: str) -> bool:
    return _clusters(ctx, name) is not None


def _linear(ctx: BlockContext, name: str) -> nn.Linear:
    module = ctx.block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise LowbitError(f"rptq reorders plain nn.Linear layers; {name!r} is a {type(module).__name__}")
    return module


def _partners(ctx: BlockContext, prev: str) -> list[nn.Linear]:
    """The linears computed beside ``prev`` from the same input with as many outputs (gate_proj
    beside up_proj): the consumer reads their product element-wise, so their rows move together."""
    prev_module = _linear(ctx, prev)
    for group in ctx.arch.sequential:
        if prev in group:
            return [
                m
                for n in group
                if n != prev
                and isinstance(m := ctx.block.get_submodule(n), nn.Linear)
                and m.out_features == prev_module.out_features
            ]
    return []
