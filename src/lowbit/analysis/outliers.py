"""Outlier features as LLM.int8() defines them (Dettmers et al., 2022, section 4): a hidden
feature of magnitude >= 6 that appears in at least 25% of the layers and at least 6% of the
sequence positions.

Our reading where the paper leaves room: a (layer, channel) is *large* when |x| >= 6 in at least
6% of that layer's tokens; a channel is an outlier feature of one input site (``self_attn.q_proj``,
``mlp.down_proj``, ...: the same channel index means the same feature across blocks) when it is
large in at least 25% of the blocks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from lowbit.analysis.capture import LinearStats, layer_index

__all__ = ["large_channels", "outlier_features", "site_of"]


def site_of(name: str) -> str:
    """The part of a linear's name after its block index (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    head, _, rest = name.partition(f".{layer_index(name)}.")
    return rest or head


def large_channels(stats: LinearStats, token_frac: float = 0.06) -> list[int]:
    """Channels whose |x| reached the capture threshold in at least ``token_frac`` of the tokens."""
    if stats.n_tokens == 0:
        return []
    frac = stats.big / stats.n_tokens
    return [int(c) for c in torch.nonzero(frac >= token_frac).flatten()]


def outlier_features(
    stats: dict[str, LinearStats], layer_frac: float = 0.25, token_frac: float = 0.06
) -> list[dict[str, Any]]:
    """Outlier features per input site: one row per (site, channel) with the blocks where it is
    large, the mean fraction of tokens it is large in there, and its largest magnitude."""
    by_site: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    n_blocks: dict[str, int] = defaultdict(int)
    for name, s in stats.items():
        site = site_of(name)
        n_blocks[site] += 1
        for c in large_channels(s, token_frac):
            by_site[site][c].append(name)
    rows = []
    for site, channels in by_site.items():
        for c, names in sorted(channels.items()):
            if len(names) < layer_frac * n_blocks[site]:
                continue
            fracs = [float(stats[n].big[c]) / stats[n].n_tokens for n in names]
            rows.append(
                {
                    "site": site,
                    "channel": c,
                    "layers": sorted(layer_index(n) for n in names),
                    "layer_share": len(names) / n_blocks[site],
                    "token_share": sum(fracs) / len(fracs),
                    "max_abs": max(float(stats[n].absmax[c]) for n in names),
                }
            )
    return rows
