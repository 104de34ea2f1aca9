"""Do outlier channels stay in the same channels across inputs? Jaccard overlap of each layer's
top-k channels (by max |x|) and of its large channels (LLM.int8()'s criterion) between two sets of
statistics: disjoint calibration subsets, or two text domains."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.analysis.capture import LinearStats
from lowbit.analysis.outliers import large_channels

__all__ = ["jaccard", "stability", "top_k_channels"]


def jaccard(a: set[int] | list[int], b: set[int] | list[int]) -> float:
    """|A & B| / |A | B|; two empty sets overlap fully (1.0)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def top_k_channels(absmax: torch.Tensor, k: int) -> set[int]:
    """The ``k`` channels of largest max |x| (ties broken by the lower index)."""
    k = min(k, absmax.numel())
    order = sorted(range(absmax.numel()), key=lambda c: (-float(absmax[c]), c))
    return set(order[:k])


def stability(
    a: dict[str, LinearStats], b: dict[str, LinearStats], k: int, token_frac: float = 0.06
) -> list[dict[str, Any]]:
    """Per linear (in ``a``'s order): ``top_k`` Jaccard of the top-k channel sets, ``large`` Jaccard
    of the large-channel sets (None when neither side has one)."""
    rows = []
    for name, sa in a.items():
        sb = b[name]
        la, lb = large_channels(sa, token_frac), large_channels(sb, token_frac)
        rows.append(
            {
                "layer": name,
                "top_k": jaccard(top_k_channels(sa.absmax, k), top_k_channels(sb.absmax, k)),
                "large": jaccard(la, lb) if la or lb else None,
            }
        )
    return rows
