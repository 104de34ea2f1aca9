"""Tests for lowbit.observers: range estimation for weights (per row) and activations (per tensor)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit import observers as obs_mod
from lowbit.errors import LowbitError
from lowbit.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    entropy_bin,
    make_observer,
    row_range,
)


def int4_sym(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 quantize-dequantize: scale = absmax / 7, levels -8..7."""
    scale = torch.maximum(lo.abs(), hi.abs()) / 7
    return torch.clamp(torch.round(x / scale), -8, 7) * scale


def batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 8), (3, 5, 7), (100,), (2, 2), (16, 33)]
    return [torch.randn(s, generator=g) * (i + 1) + i for i, s in enumerate(shapes)]


# ------------------------------------------------------------------------------------------------
# minmax / moving average
# ------------------------------------------------------------------------------------------------


def test_minmax_matches_plain_loop() -> None:
    obs = MinMaxObserver()
    lo, hi = math.inf, -math.inf
    for b in batches():
        obs.update(b)
        for v in b.reshape(-1).tolist():
            lo, hi = min(lo, v), max(hi, v)
    got_lo, got_hi = obs.range()
    assert got_lo.dtype == torch.float32 and got_lo.dim() == 0 and got_hi.dim() == 0
    assert got_lo.item() == lo and got_hi.item() == hi


def test_minmax_ignores_empty_batches_and_casts_bf16() -> None:
    obs = MinMaxObserver()
    obs.update(torch.empty(0, 5))
    with pytest.raises(LowbitError, match="before any update"):
        obs.range()
    obs.update(torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16))
    obs.update(torch.empty(0))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-2.25, 3.0) and lo.dtype == torch.float32


def test_moving_average_matches_plain_loop_and_torch() -> None:
    m = 0.1
    obs = MovingAverageMinMaxObserver(momentum=m)
    ref = torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=m)
    lo = hi = None
    for b in batches():
        obs.update(b)
        ref(b)
        bmin, bmax = b.min(), b.max()
        if lo is None or hi is None:
            lo, hi = bmin, bmax
        else:
            lo = lo + m * (bmin - lo)
            hi = hi + m * (bmax - hi)
    got_lo, got_hi = obs.range()
    assert lo is not None and hi is not None
    assert got_lo.item() == lo.item() and got_hi.item() == hi.item()
    torch.testing.assert_close(got_lo, ref.min_val, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_hi, ref.max_val, rtol=1e-6, atol=1e-6)
    # and it is not simply the global min/max
    mm = MinMaxObserver()
    for b in batches():
        mm.update(b)
    assert got_hi.item() < mm.range()[1].item()


# ------------------------------------------------------------------------------------------------
# percentile
# ------------------------------------------------------------------------------------------------


def test_percentile_exact_on_arange() -> None:
    obs = PercentileObserver(percentile=75.0)
    x = torch.arange(101, dtype=torch.float32)[torch.randperm(101, generator=torch.Generator().manual_seed(1))]
    for chunk in x.split(17):
        obs.update(chunk)
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (25.0, 75.0)
    obs = PercentileObserver(percentile=99.9)
    obs.update(torch.arange(10001, dtype=torch.float32))
    lo, hi = obs.range()
    assert lo.item() == pytest.approx(10.0, abs=1e-2) and hi.item() == pytest.approx(9990.0, abs=1e-2)


def test_percentile_normal_quantile() -> None:
    x = torch.randn(2**20, generator=torch.Generator().manual_seed(0))
    obs = PercentileObserver(percentile=99.9)
    obs.update(x)
    lo, hi = obs.range()
    assert hi.item() == pytest.approx(3.0902, abs=0.04)
    assert lo.item() == pytest.approx(-3.0902, abs=0.04)


def test_percentile_subsample_is_uniform_and_seeded() -> None:
    # values arrive in increasing order, so a sample biased to early or late batches shows in its mean
    n, k = 2**20, 2**16
    x = torch.arange(n, dtype=torch.float32)
    a = PercentileObserver(percentile=90.0, max_samples=k, seed=3)
    b = PercentileObserver(percentile=90.0, max_samples=k, seed=3)
    c = PercentileObserver(percentile=90.0, max_samples=k, seed=4)
    for chunk in x.split(50_000):
        a.update(chunk)
        b.update(chunk)
        c.update(chunk)
    sample = a._sample.values
    assert sample is not None and sample.numel() == k and sample.unique().numel() == k
    assert sample.mean().item() == pytest.approx((n - 1) / 2, rel=0.01)
    # each tenth of the stream contributes about a tenth of the sample
    counts = torch.bincount((sample * 10 / n).long(), minlength=10).float()
    assert (counts / k - 0.1).abs().max().item() < 0.01
    assert a.range()[1].item() == pytest.approx(0.9 * n, rel=0.01)
    assert a.range() == b.range() and a.range() != c.range()


def test_row_range_percentile_matches_torch_quantile_with_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(37, 50, generator=torch.Generator().manual_seed(2))
    ref = torch.quantile(x, torch.tensor([0.02, 0.98]), dim=1)
    lo, hi = row_range(x, "percentile", percentile=98.0)
    assert lo.shape == (37,) and torch.equal(lo, ref[0]) and torch.equal(hi, ref[1])
    monkeypatch.setattr(obs_mod, "_QUANTILE_MAX", 120)  # two rows per torch.quantile call
    lo2, hi2 = row_range(x, "percentile", percentile=98.0)
    assert torch.equal(lo2, lo) and torch.equal(hi2, hi)
    monkeypatch.setattr(obs_mod, "_QUANTILE_MAX", 20)  # rows longer than the limit: kthvalue path
    lo3, hi3 = row_range(x, "percentile", percentile=98.0)
    torch.testing.assert_close(lo3, lo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi3, hi, rtol=1e-6, atol=1e-6)


def test_row_range_minmax() -> None:
    x = torch.randn(5, 9, dtype=torch.float16)
    lo, hi = row_range(x)
    assert lo.dtype == torch.float32 and torch.equal(lo, x.float().min(1).values)
    assert torch.equal(hi, x.float().max(1).values)


# ------------------------------------------------------------------------------------------------
# entropy
# ------------------------------------------------------------------------------------------------


def ref_entropy_bin(hist: np.ndarray, levels: int) -> int:
    """Slow, literal reference of the TensorRT entropy calibration."""
    h = [float(v) for v in hist]
    best_i, best_kl = -1, math.inf
    for i in range(levels, len(h) + 1):
        p = h[:i]
        p[-1] += sum(h[i:])
        q = [0.0] * i
        for chunk in np.array_split(np.arange(i), levels):
            nonzero = [j for j in chunk if h[j] > 0]
            for j in nonzero:
                q[j] = sum(h[j] for j in chunk) / len(nonzero)
        p_total, q_total = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q, strict=True):
            if pj > 0:
                qn = qj / q_total if q_total > 0 else 0.0
                kl += (pj / p_total) * math.log((pj / p_total) / (qn if qn > 0 else 1e-10))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


@pytest.mark.parametrize("case", ["gauss", "gaps", "outliers", "laplace"])
def test_entropy_bin_matches_slow_reference(case: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_000, generator=g).abs()
    if case == "gaps":
        x = x[(x < 1.0) | (x > 2.0)]  # an empty band of bins: Q is 0 where P gets the outliers
    if case == "outliers":
        x = torch.cat([x, torch.tensor([25.0, 30.0])])
    if case == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((20_000,)).abs()
    hist = torch.histc(x, bins=256, min=0.0, max=float(x.max())).double().numpy()
    assert entropy_bin(hist, 8) == ref_entropy_bin(hist, 8)


def test_entropy_observer_matches_reference_threshold() -> None:
    x = torch.randn(30_000, generator=torch.Generator().manual_seed(6))
    x[:3] = torch.tensor([40.0, -35.0, 20.0])
    obs = EntropyObserver(num_bits=4, bins=256)
    for chunk in x.split(7_000):
        obs.update(chunk)
    lo, hi = obs.range()
    amax = float(x.abs().max())
    i = ref_entropy_bin(torch.histc(x.abs(), bins=256, min=0.0, max=amax).double().numpy(), 8)
    assert hi.item() == pytest.approx((i + 0.5) * amax / 256, rel=1e-6)
    assert lo.item() == -hi.item()


def test_entropy_clips_outliers() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200_000, generator=g)
    x[torch.randint(0, x.numel(), (5,), generator=g)] = torch.tensor([100.0, -120.0, 90.0, 150.0, -80.0])
    obs = make_observer("entropy")
    obs.update(x)
    lo, hi = obs.range()
    assert 2.0 < hi.item() < 0.1 * 150.0 and lo.item() == -hi.item()


def test_entropy_keeps_uniform_range() -> None:
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(8)) * 6 - 3
    obs = EntropyObserver()
    obs.update(x)
    _, hi = obs.range()
    assert hi.item() > 0.95 * x.abs().max().item()


def test_entropy_all_zero_input() -> None:
    obs = EntropyObserver()
    obs.update(torch.zeros(10))
    assert [v.item() for v in obs.range()] == [0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# mse
# ------------------------------------------------------------------------------------------------


def mse_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    lap = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(9)
    x = torch.cat([lap.sample((6, 256)), torch.randn(6, 256, generator=g)])
    x[0, 3] = 40.0
    x[7, 100] = -30.0
    x[8, 0] = 25.0
    return x


def ref_mse_rows(x: torch.Tensor, grid: int = 100, maxshrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    los, his = [], []
    for row in x:
        row = row[None]
        lo0, hi0 = row.min(), row.max()
        best_err, best = math.inf, (lo0, hi0)
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            lo, hi = p * lo0, p * hi0
            err = (int4_sym(row, lo.reshape(1, 1), hi.reshape(1, 1)) - row).abs().pow(2.0).sum(1).item()
            if err < best_err:
                best_err, best = err, (lo, hi)
        los.append(best[0])
        his.append(best[1])
    return torch.stack(los), torch.stack(his)


def quant_err(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (int4_sym(x, lo[:, None], hi[:, None]) - x).pow(2).sum(1)


def test_mse_row_range_beats_minmax_and_clips_outliers(monkeypatch: pytest.MonkeyPatch) -> None:
    x = mse_rows()
    lo, hi = row_range(x, "mse", fake_quant=int4_sym)
    mlo, mhi = row_range(x, "minmax")
    assert lo.shape == (12,) and lo.dtype == torch.float32
    for r in (0, 7, 8):  # outlier rows: strictly inside min-max
        assert lo[r] > mlo[r] and hi[r] < mhi[r]
    assert bool((lo >= mlo).all() and (hi <= mhi).all())
    assert bool((quant_err(x, lo, hi) <= quant_err(x, mlo, mhi)).all())
    assert bool((quant_err(x, lo, hi)[[0, 7, 8]] < quant_err(x, mlo, mhi)[[0, 7, 8]]).all())
    ref_lo, ref_hi = ref_mse_rows(x)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    monkeypatch.setattr(obs_mod, "_MSE_CHUNK", 600)  # two rows per chunk
    lo2, hi2 = row_range(x, "mse", fake_quant=int4_sym)
    assert torch.equal(lo2, lo) and torch.equal(hi2, hi)


def test_mse_ties_keep_the_larger_range_and_nan_rows_keep_minmax() -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(10))
    x[2] = 0.0  # int4_sym divides by a zero scale here: NaN error for every candidate

    def flat(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)  # same error for every candidate

    for fq in (flat, int4_sym):
        lo, hi = row_range(x, "mse", fake_quant=fq)
        assert lo[2].item() == hi[2].item() == 0.0
    lo, hi = row_range(x, "mse", fake_quant=flat)
    assert torch.equal(lo, x.min(1).values) and torch.equal(hi, x.max(1).values)


def test_mse_observer_equals_single_row_search() -> None:
    x = mse_rows()
    obs = make_observer("mse", fake_quant=int4_sym, grid=50)
    for row in x:
        obs.update(row)
    lo, hi = obs.range()
    ref_lo, ref_hi = row_range(x.reshape(1, -1), "mse", fake_quant=int4_sym, grid=50)
    assert lo.dim() == 0 and lo.item() == ref_lo.item() and hi.item() == ref_hi.item()
    assert hi.item() < x.max().item()


# ------------------------------------------------------------------------------------------------
# registry and errors
# ------------------------------------------------------------------------------------------------


def test_registry_builds_all() -> None:
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "entropy", "mse"}
    for name in OBSERVERS:
        kwargs = {"fake_quant": int4_sym} if name == "mse" else {}
        obs = make_observer(name, **kwargs)
        assert isinstance(obs, Observer) and isinstance(obs, OBSERVERS[name])
        with pytest.raises(LowbitError, match="before any update"):
            obs.range()
        obs.update(torch.linspace(-1, 1, 1000))
        lo, hi = obs.range()
        assert lo.dtype == hi.dtype == torch.float32 and -1.01 <= lo.item() < 0 < hi.item() <= 1.01


def test_unknown_observer_and_kwarg() -> None:
    with pytest.raises(LowbitError, match=r"unknown observer 'minmaxx'.*'entropy'.*'percentile'"):
        make_observer("minmaxx")
    with pytest.raises(LowbitError, match=r"unknown argument 'pct'.*'percentile', 'max_samples', 'seed'"):
        make_observer("percentile", pct=99.0)
    with pytest.raises(LowbitError, match=r"unknown argument 'momentum'.*none"):
        make_observer("minmax", momentum=0.1)


def test_bad_argument_values() -> None:
    with pytest.raises(LowbitError, match="percentile must be in"):
        PercentileObserver(percentile=101.0)
    with pytest.raises(LowbitError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=0.0)
    with pytest.raises(LowbitError, match="bins must be"):
        EntropyObserver(num_bits=8, bins=100)
    with pytest.raises(LowbitError, match="maxshrink"):
        row_range(torch.ones(2, 2), "mse", fake_quant=int4_sym, maxshrink=1.5)
    with pytest.raises(LowbitError, match=r"unknown argument 'grid' for method 'percentile'"):
        row_range(torch.ones(2, 2), "percentile", grid=10)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise(bad: float) -> None:
    x = torch.randn(4, 8)
    x[2, 5] = bad
    for name in OBSERVERS:
        obs = make_observer(name, **({"fake_quant": int4_sym} if name == "mse" else {}))
        with pytest.raises(LowbitError, match="contains NaN or inf"):
            obs.update(x)
    for method in ("minmax", "percentile", "mse"):
        with pytest.raises(LowbitError, match="contains NaN or inf"):
            row_range(x, method, fake_quant=int4_sym)


def test_mse_without_fake_quant_and_row_method_errors() -> None:
    with pytest.raises(LowbitError, match="needs fake_quant"):
        row_range(torch.randn(2, 4), "mse")
    with pytest.raises(LowbitError, match="needs fake_quant"):
        make_observer("mse")
    with pytest.raises(LowbitError, match="needs fake_quant"):
        MseObserver()
    with pytest.raises(LowbitError, match=r"'entropy' is for activations.*'minmax'"):
        row_range(torch.randn(2, 4), "entropy")
    with pytest.raises(LowbitError, match=r"unknown row range method 'max'.*'minmax', 'mse', 'percentile'"):
        row_range(torch.randn(2, 4), "max")
