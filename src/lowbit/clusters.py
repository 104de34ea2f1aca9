"""Channel clusters for per-cluster activation quantization (RPTQ, Yuan et al. 2023).

RPTQ describes each input channel of an activation by its (min, max) over the calibration set,
groups the channels with K-means into ``k`` clusters, and gives each cluster one static scale and
zero point. Pure functions and one stateful observer:

- ``kmeans``: seeded K-means with k-means++ initialisation on points (n, d), float64;
- ``cluster_ranges``: per-channel (lo, hi) (H,) and labels (H,) -> per-cluster (lo, hi) (k,);
- ``ChannelRangeObserver``: the per-channel min and max of an activation (..., H) over every
  token seen (all-reduced over data-parallel workers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit import dist
from lowbit.errors import LowbitError


def _pick(weights: Tensor, gen: torch.Generator) -> int:
    """An index drawn with probability proportional to ``weights`` (n,) float64 >= 0: the first
    ``i`` whose cumulative share exceeds one uniform draw (uniform over all points when every
    weight is 0: fewer distinct points than clusters)."""
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    total = float(weights.sum())
    if total <= 0.0:
        return min(int(u * weights.numel()), weights.numel() - 1)
    cum = torch.cumsum(weights, 0) / total
    hit = torch.nonzero(cum > u).flatten()
    return int(hit[0]) if hit.numel() else weights.numel() - 1


def _sq_dist(points: Tensor, centers: Tensor) -> Tensor:
    """(n, k) squared Euclidean distances, summed coordinate by coordinate (exact order)."""
    d = torch.zeros(points.shape[0], centers.shape[0], dtype=torch.float64)
    for j in range(points.shape[1]):
        diff = points[:, j : j + 1] - centers[None, :, j]
        d += diff * diff
    return d


def kmeans_init(points: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): the first center uniformly, each next one with
    probability proportional to the squared distance to the nearest chosen center. (k, d)."""
    first = _pick(torch.ones(points.shape[0], dtype=torch.float64), gen)
    centers = [points[first]]
    nearest = _sq_dist(points, points[first][None]).squeeze(1)
    for _ in range(1, k):
        i = _pick(nearest, gen)
        centers.append(points[i])
        nearest = torch.minimum(nearest, _sq_dist(points, points[i][None]).squeeze(1))
    return torch.stack(centers)


def kmeans(points: Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[Tensor, Tensor]:
    """Lloyd's K-means of ``points`` (n, d) into ``k`` clusters, k-means++ initialisation from a
    ``torch.Generator`` seeded with ``seed``; computed in float64.

    Each iteration assigns every point to its nearest center (ties: the lower center index) and
    moves each center to the mean of its points (sum / count; a center with no points stays where
    it is). Stops when no assignment changes or after ``iters`` iterations. Clusters are then
    renumbered by their centers in lexicographic order (so cluster 0 has the smallest first
    coordinate: for RPTQ's (min, max) points, the most negative minima). Returns (labels (n,)
    int64, centers (k, d) float64). ``k`` larger than ``n`` is an error.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise LowbitError(f"kmeans needs points of shape (n, d) with n > 0, got {tuple(points.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= points.shape[0]:
        raise LowbitError(f"kmeans: the number of clusters must be an integer in 1..{points.shape[0]}, got {k!r}")
    x = points.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        raise LowbitError("kmeans: the points contain NaN or inf")
    gen = torch.Generator().manual_seed(seed)
    centers = kmeans_init(x, k, gen)
    labels = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for _ in range(iters):
        new = _sq_dist(x, centers).argmin(1)  # argmin returns the first minimum: lowest index
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if members.shape[0]:
                centers[c] = members.sum(0) / members.shape[0]
    return _renumber(labels, centers)


def _renumber(labels: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Clusters renumbered by their centers in lexicographic order (stable)."""
    order = sorted(range(centers.shape[0]), key=lambda c: tuple(centers[c].tolist()))
    new_of_old = torch.empty(len(order), dtype=torch.int64)
    new_of_old[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    return new_of_old[labels], centers[torch.tensor(order, dtype=torch.int64)]


def channel_clusters(lo: Tensor, hi: Tensor, k: int, seed: int = 0, iters: int = 100) -> Tensor:
    """RPTQ's clustering: K-means on the points (min_j, max_j) of each channel ``j``; labels (H,).
    ``k`` is capped at the number of channels."""
    points = torch.stack([lo.detach().double().cpu(), hi.detach().double().cpu()], 1)
    return kmeans(points, min(k, points.shape[0]), seed, iters)[0]


def cluster_ranges(lo: Tensor, hi: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster range: the min of the members' minima and the max of their maxima, (k,) each.
    A cluster with no member gets the range [0, 0] (scale 1 downstream)."""
    labels = labels.to(lo.device)
    out_lo = torch.full((k,), math.inf, dtype=torch.float32, device=lo.device)
    out_hi = torch.full((k,), -math.inf, dtype=torch.float32, device=lo.device)
    out_lo = out_lo.scatter_reduce(0, labels, lo.float(), reduce="amin")
    out_hi = out_hi.scatter_reduce(0, labels, hi.float(), reduce="amax")
    empty = torch.isinf(out_lo)
    return out_lo.masked_fill(empty, 0.0), out_hi.masked_fill(empty, 0.0)


class ChannelRangeObserver:
    """Running per-channel min and max of an activation (..., H): two (H,) float32 tensors."""

    def __init__(self) -> None:
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def update(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if rows.shape[0] == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise LowbitError("the activation contains NaN or inf; cannot observe its channel ranges")
        lo, hi = rows.amin(0), rows.amax(0)
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def range(self) -> tuple[Tensor, Tensor]:
        if self._lo is None or self._hi is None:
            raise LowbitError("ChannelRangeObserver saw no data; give calibration samples")
        return self._lo, self._hi

    def reduce(self) -> None:
        """Min of the workers' minima and max of their maxima (a no-op in one process)."""
        if dist.world() == 1:
            return
        if self._lo is None or self._hi is None:
            raise LowbitError("a data-parallel worker saw no calibration input; give more samples than workers")
        dist.all_reduce_min_(self._lo)
        dist.all_reduce_max_(self._hi)
