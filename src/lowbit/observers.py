"""Range estimation ("observers"): clipping ranges ``(lo, hi)`` for quantization.

:func:`row_range` is stateless, for weights: one range per row (quantization group) of an
``(R, N)`` tensor. The observer classes are stateful, for activations: one range per tensor,
accumulated over calibration batches. Symmetric callers use ``max(|lo|, |hi|)``. Numerics run
in float32; NaN or inf inputs raise :class:`LowbitError` instead of poisoning the range.

Data-parallel calibration (:mod:`lowbit.dist`): each rank updates its observers with its share
of the samples and calls ``reduce()`` once before ``range()``. Min-max ranges are then exactly
the single-process ones; the moving average is folded over the ranks in rank order (equal up
to rounding when the ranks' batches are the single process's batches); sampled observers
(percentile, entropy, MSE) gather their samples, which is exact while everything seen fits in
``max_samples`` and otherwise a uniform sample of the same size from all ranks' values.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from lowbit import dist
from lowbit.errors import LowbitError

FakeQuant = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``fake_quant(x, lo, hi)``: x (R, N) float32, lo and hi (R, 1) float32 -> quantize-dequantized
x (R, N). Supplied by the caller, which knows the number format and the symmetry."""

_QUANTILE_MAX = 2**24  # torch.quantile refuses inputs with more elements than this
_MSE_CHUNK = 2**22  # rows are searched in chunks of about this many elements
_KL_EPS = 1e-10  # stands in for Q where Q == 0 but P > 0 (as NVIDIA's calibrators do)
_RANK_SEED_STRIDE = 1_000_003  # rank r's reservoir keys are seeded with seed + r * this (rank 0: seed)

_ROW_METHOD_ARGS = {"minmax": (), "percentile": ("percentile",), "mse": ("grid", "maxshrink", "norm")}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LowbitError(message)


def _check_finite(x: Tensor, what: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise LowbitError(f"{what} contains NaN or inf values; find where they come from (overflow in fp16?)")


def _check_mse_args(grid: int, maxshrink: float, norm: float) -> None:
    _check(isinstance(grid, int) and grid >= 1, f"mse grid must be an integer >= 1, got {grid!r}")
    _check(0.0 < maxshrink <= 1.0, f"mse maxshrink must be in (0, 1], got {maxshrink}")
    _check(norm > 0.0, f"mse norm must be > 0, got {norm}")


def quantile_rows(x: Tensor, qs: Sequence[float]) -> Tensor:
    """Per-row quantiles with linear interpolation (``torch.quantile`` semantics).

    x: (R, N) float32, N >= 1. Returns (len(qs), R) float32. Rows are processed in chunks so
    ``torch.quantile``'s 16M-element input limit is never hit; a single row longer than that is
    interpolated from ``kthvalue`` order statistics.
    """
    r, n = x.shape
    if n <= _QUANTILE_MAX:
        q = torch.tensor(list(qs), dtype=x.dtype, device=x.device)
        step = max(1, _QUANTILE_MAX // n)
        return torch.cat([torch.quantile(x[i : i + step], q, dim=1) for i in range(0, r, step)], dim=1)
    out = torch.empty(len(qs), r, dtype=x.dtype, device=x.device)
    for j, prob in enumerate(qs):  # rows too long for torch.quantile: two order statistics each
        pos = prob * (n - 1)
        below = x.kthvalue(math.floor(pos) + 1, dim=1).values
        above = x.kthvalue(math.ceil(pos) + 1, dim=1).values
        out[j] = torch.lerp(below, above, pos - math.floor(pos))
    return out


def mse_search(
    x: Tensor,
    lo0: Tensor,
    hi0: Tensor,
    fake_quant: FakeQuant,
    *,
    grid: int = 100,
    maxshrink: float = 0.8,
    norm: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Shrink search for the clipping range with the lowest quantization error (GPTQ style).

    x: (R, N) float32; lo0, hi0: (R,) float32 starting ranges (usually min / max).
    Candidates are ``(p * lo0, p * hi0)`` for ``p = 1 - i / grid``, ``i < int(maxshrink * grid)``;
    each row keeps the candidate with the smallest ``sum(|fake_quant(x) - x| ** norm)``, the
    earlier (larger) one on ties. Returns lo, hi: (R,) float32. Rows whose error is never
    finite keep ``(lo0, hi0)``.
    """
    best_lo, best_hi = lo0.clone(), hi0.clone()
    step = max(1, _MSE_CHUNK // x.shape[1])
    for s in range(0, x.shape[0], step):
        xc, l0, h0 = x[s : s + step], lo0[s : s + step], hi0[s : s + step]
        out_lo, out_hi = best_lo[s : s + step], best_hi[s : s + step]  # views, written in place
        best = torch.full_like(l0, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            lo, hi = p * l0, p * h0
            squared_error = getattr(fake_quant, "squared_error", None)
            if norm == 2.0 and squared_error is not None:  # the same numbers with fewer temporaries
                err = squared_error(xc, lo[:, None], hi[:, None])
            else:
                diff = fake_quant(xc, lo[:, None], hi[:, None]) - xc
                # squaring by a product: a fractional power costs ~10x more on CPU
                err = (diff * diff).sum(1) if norm == 2.0 else diff.abs_().pow_(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            out_lo[better], out_hi[better] = lo[better], hi[better]
    return best_lo, best_hi


def entropy_bin(hist: np.ndarray, levels: int) -> int:
    """TensorRT entropy calibration on a histogram of |x|: the bin count ``i`` with least KL.

    hist: (bins,) non-negative counts over [0, max|x|], bins >= levels. For each
    ``i in [levels, bins]``: P is ``hist[:i]`` with the mass of ``hist[i:]`` added to its last
    bin; Q merges ``hist[:i]`` into ``levels`` consecutive chunks (``np.array_split`` sizes) and
    spreads each chunk's total evenly over the chunk's non-zero bins (zero bins stay zero).
    KL(P || Q) is summed where P > 0, with Q replaced by a tiny epsilon where it is 0. Returns
    the ``i`` with the smallest KL (the first on ties); the threshold is ``(i + 0.5) * width``.
    """
    h = np.asarray(hist, dtype=np.float64)
    bins = h.shape[0]
    total = h.sum()
    if h.ndim != 1 or bins < levels or total <= 0:
        raise ValueError(f"entropy_bin needs a 1-D histogram with >= {levels} bins and some counts")
    csum = np.concatenate([[0.0], np.cumsum(h)])
    nonzero = h > 0
    ccount = np.concatenate([[0], np.cumsum(nonzero)])
    ks = np.arange(levels + 1)
    best_i, best_kl = bins, np.inf
    for i in range(levels, bins + 1):
        size, extra = divmod(i, levels)
        bounds = ks * size + np.minimum(ks, extra)
        chunk_sum, chunk_count = np.diff(csum[bounds]), np.diff(ccount[bounds])
        q = np.repeat(chunk_sum / np.maximum(chunk_count, 1), np.diff(bounds)) * nonzero[:i]
        p = h[:i].copy()
        p[-1] += total - csum[i]
        p /= total
        q_total = q.sum()
        pm, qm = p[p > 0], (q / q_total if q_total > 0 else q)[p > 0]
        kl = float(np.sum(pm * np.log(pm / np.where(qm > 0, qm, _KL_EPS))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def row_range(
    x: Tensor, method: str = "minmax", *, fake_quant: FakeQuant | None = None, **args: Any
) -> tuple[Tensor, Tensor]:
    """Clipping range per row, for weights.

    x: (R, N) float tensor, any float dtype (computed in float32); each row is one
    quantization group. Returns lo, hi: (R,) float32 on x's device.

    methods: ``minmax``; ``percentile`` (``percentile=99.99``: hi is the p/100 quantile of the
    row, lo the 1 - p/100 quantile); ``mse`` (``grid=100, maxshrink=0.8, norm=2.0``, needs
    ``fake_quant``; see :func:`mse_search`). ``fake_quant`` is ignored by the other methods.
    """
    if method == "entropy":
        raise LowbitError(
            "observer 'entropy' is for activations (use EntropyObserver / make_observer('entropy')); "
            f"for weight rows choose one of {sorted(_ROW_METHOD_ARGS)}"
        )
    if method not in _ROW_METHOD_ARGS:
        raise LowbitError(f"unknown row range method {method!r}; choose one of {sorted(_ROW_METHOD_ARGS)}")
    valid = _ROW_METHOD_ARGS[method]
    for name in args:
        _check(name in valid, f"unknown argument {name!r} for method {method!r}; valid: {list(valid)}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"row_range expects a 2-D tensor with >= 1 column, got shape {tuple(x.shape)}")
    _check_finite(x, "tensor passed to row_range")
    x = x.detach().float()
    if method == "percentile":
        p = float(args.get("percentile", 99.99))
        _check(50.0 <= p <= 100.0, f"percentile must be in [50, 100] (e.g. 99.99), got {p}")
        lo, hi = quantile_rows(x, [1 - p / 100, p / 100])
        return lo, hi
    lo0, hi0 = torch.aminmax(x, dim=1)
    if method == "minmax":
        return lo0, hi0
    if fake_quant is None:
        raise LowbitError("row_range method 'mse' needs fake_quant (the quantize-dequantize function)")
    grid, maxshrink, norm = args.get("grid", 100), float(args.get("maxshrink", 0.8)), args.get("norm", 2.0)
    _check_mse_args(grid, maxshrink, float(norm))
    return mse_search(x, lo0, hi0, fake_quant, grid=grid, maxshrink=maxshrink, norm=float(norm))


@runtime_checkable
class Observer(Protocol):
    """Accumulates a per-tensor range over calibration batches."""

    def update(self, x: Tensor) -> None:
        """x: any shape, any float dtype; flattened. Empty tensors are ignored."""

    def range(self) -> tuple[Tensor, Tensor]:
        """0-d float32 tensors lo, hi. LowbitError if no non-empty update was seen."""

    def reduce(self) -> None:
        """Combine the state of every torch.distributed rank (a collective: every rank calls it,
        exactly once, after its last ``update`` and before ``range``). A no-op in one process."""


def _flat(x: Tensor) -> Tensor:
    _check_finite(x, "activation passed to observer.update()")
    return x.detach().reshape(-1)


def _no_data(name: str) -> LowbitError:
    return LowbitError(f"{name}.range() called before any update() with data; run calibration batches first")


class _Reservoir:
    """Uniform random sample without replacement of at most ``size`` values from all added.

    Every value gets a seeded random key in [0, 1) and the ``size`` smallest keys are kept, so
    all values are kept while they fit and a uniform subsample of everything seen after that.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.values: Tensor | None = None  # (n,) float32, n <= size
        self._keys: Tensor | None = None  # (n,) float64
        self._gen: torch.Generator | None = None

    def add(self, x: Tensor) -> None:
        """x: (n,) float32."""
        if self._gen is None:
            self._gen = torch.Generator(device=x.device)
            self._gen.manual_seed(self.seed + _RANK_SEED_STRIDE * dist.rank())  # independent keys per rank
        device = self._gen.device
        x = x.to(device)
        keys = torch.rand(x.numel(), generator=self._gen, device=device, dtype=torch.float64)
        if self.values is not None and self._keys is not None:
            if self.values.numel() >= self.size:
                enters = keys < self._keys.max()
                x, keys = x[enters], keys[enters]
            x, keys = torch.cat([self.values, x]), torch.cat([self._keys, keys])
        if x.numel() > self.size:
            keys, idx = torch.topk(keys, self.size, largest=False, sorted=False)
            x = x[idx]
        self.values, self._keys = x, keys

    def reduce(self) -> None:
        """Gather every rank's kept values (in rank order) and keep the ``size`` with the smallest
        keys: all of them while they fit, else a uniform sample of all ranks' values (each rank's
        reservoir holds its smallest keys, so the union holds the overall smallest)."""
        if dist.world() == 1:
            return
        values = self.values if self.values is not None else torch.empty(0, dtype=torch.float32)
        keys = self._keys if self._keys is not None else torch.empty(0, dtype=torch.float64)
        values, keys = dist.all_gather_cat(values), dist.all_gather_cat(keys.to(values.device))
        if values.numel() == 0:
            return
        if values.numel() > self.size:
            keys, idx = torch.topk(keys, self.size, largest=False, sorted=False)
            values = values[idx]
        self.values, self._keys = values, keys


class MinMaxObserver:
    """Running global min and max."""

    def __init__(self) -> None:
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None
        self._batches = 0  # non-empty updates seen, and the first one's range (for reduce)
        self._first: tuple[Tensor, Tensor] | None = None

    def update(self, x: Tensor) -> None:
        x = _flat(x)
        if x.numel() == 0:
            return
        lo, hi = (v.float() for v in torch.aminmax(x))
        self._batches += 1
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
            self._first = (lo, hi)
        else:
            self._lo, self._hi = self._merge(self._lo, self._hi, lo, hi)

    def _merge(self, lo: Tensor, hi: Tensor, batch_lo: Tensor, batch_hi: Tensor) -> tuple[Tensor, Tensor]:
        return torch.minimum(lo, batch_lo), torch.maximum(hi, batch_hi)

    def range(self) -> tuple[Tensor, Tensor]:
        if self._lo is None or self._hi is None:
            raise _no_data(type(self).__name__)
        return self._lo, self._hi

    def reduce(self) -> None:
        """Min of the ranks' lows and max of their highs: exactly the single-process range."""
        if dist.world() == 1:
            return
        inf = torch.tensor(math.inf, dtype=torch.float32)
        lo = (self._lo if self._lo is not None else inf).clone()
        hi = (self._hi if self._hi is not None else -inf).clone()
        dist.all_reduce_min_(lo)
        dist.all_reduce_max_(hi)
        if bool(torch.isfinite(lo)):  # some rank saw data (inputs are checked finite)
            self._lo, self._hi = lo, hi


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (PyTorch's convention).

    The first batch sets lo / hi; later ``lo += momentum * (batch_min - lo)``, likewise hi.
    """

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        _check(0.0 < momentum <= 1.0, f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _merge(self, lo: Tensor, hi: Tensor, batch_lo: Tensor, batch_hi: Tensor) -> tuple[Tensor, Tensor]:
        return lo + self.momentum * (batch_lo - lo), hi + self.momentum * (batch_hi - hi)

    def reduce(self) -> None:
        """Continue the average over the ranks in rank order, as one process would have seen
        their batches: a rank's ``k`` batches (first batch ``c``, average ``e``) turn the running
        value ``a`` into ``(1 - m)^k a + e - (1 - m)^k c``. Computed in float64, so equal to the
        single process up to rounding when the ranks' batches are its batches (contiguous shares
        that are multiples of the batch size)."""
        if dist.world() == 1:
            return
        row = torch.zeros(5, dtype=torch.float64)
        if self._lo is not None and self._hi is not None and self._first is not None:
            row = torch.tensor(
                [self._batches, float(self._first[0]), float(self._first[1]), float(self._lo), float(self._hi)],
                dtype=torch.float64,
            )
        acc: Tensor | None = None
        batches = 0
        for r in dist.all_gather(row):
            k = int(r[0])
            if k == 0:
                continue
            batches += k
            if acc is None:
                acc = r[3:5].clone()
            else:
                decay = (1.0 - self.momentum) ** k
                acc = decay * acc + r[3:5] - decay * r[1:3]
        if acc is not None:
            device = self._lo.device if self._lo is not None else torch.device("cpu")
            self._lo, self._hi = (v.to(device=device, dtype=torch.float32) for v in acc)
            self._batches = batches


class _SampledObserver:
    """Base for observers that keep a sample of (a transform of) the values: all of them up to
    ``max_samples``, beyond that a seeded uniform random sample of everything seen."""

    def __init__(self, max_samples: int, seed: int) -> None:
        _check(
            isinstance(max_samples, int) and max_samples >= 1,
            f"max_samples must be >= 1, got {max_samples!r}",
        )
        self._sample = _Reservoir(max_samples, seed)

    def update(self, x: Tensor) -> None:
        x = _flat(x)
        if x.numel():
            self._observe(x.float())

    def _observe(self, x: Tensor) -> None:
        self._sample.add(x)

    def reduce(self) -> None:
        """Gather the ranks' samples (see :meth:`_Reservoir.reduce`)."""
        self._sample.reduce()

    def _values(self) -> Tensor:
        if self._sample.values is None:
            raise _no_data(type(self).__name__)
        return self._sample.values


class PercentileObserver(_SampledObserver):
    """Percentile range (hi: p/100 quantile, lo: 1 - p/100 quantile) of all values seen.

    Exact up to ``max_samples`` values; beyond that the percentiles are estimated from a
    seeded uniform random sample of ``max_samples`` values out of everything seen.
    """

    def __init__(self, percentile: float = 99.99, max_samples: int = 2**22, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        _check(50.0 <= percentile <= 100.0, f"percentile must be in [50, 100] (e.g. 99.99), got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[Tensor, Tensor]:
        p = self.percentile
        lo, hi = quantile_rows(self._values()[None], [1 - p / 100, p / 100])[:, 0]
        return lo, hi


class EntropyObserver(_SampledObserver):
    """TensorRT entropy (KL) calibration: symmetric range ``(-t, t)``, see :func:`entropy_bin`.

    The histogram of |x| (``bins`` bins over [0, max|x|], max over everything seen) is built at
    ``range()`` time from a sample of |x| kept as in :class:`PercentileObserver`.
    """

    def __init__(self, num_bits: int = 8, bins: int = 2048, max_samples: int = 2**22, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        _check(isinstance(num_bits, int) and 2 <= num_bits <= 16, f"num_bits must be 2..16, got {num_bits!r}")
        self.levels = 2 ** (num_bits - 1)
        _check(isinstance(bins, int) and bins >= self.levels, f"bins must be >= {self.levels}, got {bins!r}")
        self.bins = bins
        self._amax: Tensor | None = None

    def _observe(self, x: Tensor) -> None:
        a = x.abs()
        amax = a.max()
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax.to(self._amax.device))
        self._sample.add(a)

    def reduce(self) -> None:
        """Max of the ranks' max|x| (exact) and their gathered samples."""
        super().reduce()
        if dist.world() == 1:
            return
        amax = (self._amax if self._amax is not None else torch.tensor(-1.0)).float().clone()
        dist.all_reduce_max_(amax)
        if float(amax) >= 0:
            self._amax = amax

    def range(self) -> tuple[Tensor, Tensor]:
        values = self._values()
        amax = float(self._amax) if self._amax is not None else 0.0
        if amax == 0.0:
            return torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
        hist = torch.histc(values, bins=self.bins, min=0.0, max=amax)
        i = entropy_bin(hist.cpu().double().numpy(), self.levels)
        t = torch.tensor((i + 0.5) * amax / self.bins, dtype=torch.float32)
        return -t, t


class MseObserver(_SampledObserver):
    """MSE-optimal range: :func:`mse_search` on a sample of the values (kept as in
    :class:`PercentileObserver`), starting from the running min / max of everything seen."""

    def __init__(
        self,
        fake_quant: FakeQuant | None = None,
        grid: int = 100,
        maxshrink: float = 0.8,
        norm: float = 2.0,
        max_samples: int = 2**22,
        seed: int = 0,
    ) -> None:
        super().__init__(max_samples, seed)
        if fake_quant is None:
            raise LowbitError("observer 'mse' needs fake_quant (the quantize-dequantize function)")
        _check_mse_args(grid, maxshrink, norm)
        self.fake_quant, self.grid, self.maxshrink, self.norm = fake_quant, grid, maxshrink, norm
        self._minmax = MinMaxObserver()

    def _observe(self, x: Tensor) -> None:
        self._minmax.update(x)
        self._sample.add(x)

    def reduce(self) -> None:
        """The ranks' min / max (exact) and their gathered samples."""
        super().reduce()
        self._minmax.reduce()

    def range(self) -> tuple[Tensor, Tensor]:
        sample = self._values()[None]
        lo0, hi0 = (v.to(sample.device).reshape(1) for v in self._minmax.range())
        lo, hi = mse_search(sample, lo0, hi0, self.fake_quant, grid=self.grid, maxshrink=self.maxshrink, norm=self.norm)
        return lo[0], hi[0]


OBSERVERS: dict[str, type] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MseObserver,
}


def make_observer(name: str, **kwargs: Any) -> Observer:
    """Build the activation observer registered as ``name`` with keyword arguments ``kwargs``."""
    if name not in OBSERVERS:
        raise LowbitError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}")
    cls = OBSERVERS[name]
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    for key in kwargs:
        _check(key in valid, f"unknown argument {key!r} for observer {name!r}; valid: {valid or 'none'}")
    obs: Observer = cls(**kwargs)
    return obs
