"""Per-cluster against per-channel activation ranges (RPTQ's question): static quantization of a
layer's input with one range per cluster of channels, clustered by K-means on each channel's
(min, max), for 1..N clusters; per-tensor is 1 cluster, per-channel is one cluster per channel.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.formats import get_format
from lowbit.primitives import fake_quantize_range

__all__ = ["cluster_loss", "cluster_losses", "kmeans"]


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iters: int = 25) -> torch.Tensor:
    """Lloyd's K-means with k-means++ seeding (a seeded generator). ``points`` (n, d) float ->
    labels (n,) int64 in [0, k). ``k`` >= n gives every point its own cluster."""
    n = points.shape[0]
    if k >= n:
        return torch.arange(n)
    pts = points.double()
    gen = torch.Generator().manual_seed(seed)
    centers = [pts[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(pts, torch.stack(centers)).amin(1) ** 2
        pick = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)) if float(d2.sum()) > 0 else len(centers)
        centers.append(pts[pick % n])
    c = torch.stack(centers)
    labels = torch.cdist(pts, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = pts[labels == j]
            if members.shape[0]:
                c[j] = members.mean(0)
        new = torch.cdist(pts, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def cluster_loss(x: torch.Tensor, cmin: torch.Tensor, cmax: torch.Tensor, labels: torch.Tensor, fmt: str) -> float:
    """MSE of ``x`` (tokens, C) quantized statically (asymmetric for integer formats) with one range per
    cluster: the union of its channels' [min, max]. ``labels`` (C,) assigns channels to clusters."""
    lo, hi = torch.empty_like(cmin), torch.empty_like(cmax)
    for j in labels.unique():
        sel = labels == j
        lo[sel], hi[sel] = cmin[sel].min(), cmax[sel].max()
    f = get_format(fmt)
    xq = fake_quantize_range(x, lo[None], hi[None], f, not fmt.startswith("uint"), "float32")
    return float(((xq.double() - x.double()) ** 2).mean())


def cluster_losses(
    x: torch.Tensor, cmin: torch.Tensor, cmax: torch.Tensor, ks: list[int], fmt: str = "uint4", seed: int = 0
) -> dict[str, Any]:
    """``cluster_loss`` for each cluster count in ``ks`` and for per-channel ranges."""
    points = torch.stack([cmin, cmax], 1)
    losses = {k: cluster_loss(x, cmin, cmax, kmeans(points, k, seed), fmt) for k in ks}
    per_channel = cluster_loss(x, cmin, cmax, torch.arange(cmin.numel()), fmt)
    return {"format": fmt, "by_clusters": losses, "per_channel": per_channel}
