"""Data-parallel calibration (lowbit.dist): each test spawns 2 gloo workers on CPU.

The worker functions are module-level (spawned processes import them by name); they check
what every rank sees with ``assert`` (a failed assert comes back as the run's LowbitError) and
return rank 0's state, which the test compares with one process fed every input. Heavy
imports (transformers, via lowbit.kvcache) happen inside the workers that need them.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import pytest
import torch

from lowbit import dist
from lowbit.errors import LowbitError
from lowbit.gptq import HessianAccumulator
from lowbit.observers import make_observer

N = 2  # workers per test


def _batches(seed: int, n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) * (1 + i) + 0.1 * i for i in range(n)]


def _my_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's contiguous share of the batches, as the runner shares samples."""
    idx = dist.split_samples(torch.arange(len(batches))[:, None])[:, 0]
    return [batches[int(i)] for i in idx]


# --- run_workers -------------------------------------------------------------------------


def _whoami(x: int, *, y: int) -> tuple[int, int, bool, int, int]:
    return dist.rank(), dist.world(), dist.is_main(), x + y, torch.get_num_threads()


def _fail_on_rank_1() -> None:
    if dist.rank() == 1:
        raise ValueError("boom on purpose")
    torch.distributed.barrier()  # rank 0 waits for rank 1, which never comes: it is terminated


def test_not_distributed_is_one_rank() -> None:
    assert (dist.world(), dist.rank(), dist.is_main()) == (1, 0, True)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert dist.all_reduce_scalar(3.5, "max") == 3.5
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    ids = torch.arange(6).reshape(3, 2)
    assert torch.equal(dist.split_samples(ids), ids)
    assert dist.run_workers(1, _whoami, 1, y=2)[:4] == (0, 1, True, 3)


def test_run_workers_returns_rank_0_result() -> None:
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // N))
    assert dist.run_workers(N, _whoami, 40, y=2) == (0, N, True, 42, threads)
    assert dist.world() == 1  # the parent never joined a group


def test_run_workers_propagates_a_worker_error() -> None:
    with pytest.raises(LowbitError, match=r"worker 1 of 2 failed: ValueError: boom on purpose") as e:
        dist.run_workers(N, _fail_on_rank_1)
    assert "Traceback" in str(e.value) and "_fail_on_rank_1" in str(e.value)


def test_run_workers_refuses_bad_counts() -> None:
    with pytest.raises(LowbitError, match="positive integer"):
        dist.run_workers(0, _whoami, 1, y=1)


# --- collectives -------------------------------------------------------------------------


def _collectives() -> None:
    r, w = dist.rank(), dist.world()
    for dtype in (torch.float64, torch.float32, torch.int64, torch.int32):
        base = torch.tensor([[1, -2], [3, 4]], dtype=dtype) * (r + 1)
        s, mx, mn = base.clone(), base.clone(), base.clone()
        assert dist.all_reduce_sum_(s) is s
        dist.all_reduce_max_(mx)
        dist.all_reduce_min_(mn)
        total = sum(range(1, w + 1))
        assert torch.equal(s, torch.tensor([[1, -2], [3, 4]], dtype=dtype) * total), (dtype, s)
        assert torch.equal(mx, torch.tensor([[w, -2], [3 * w, 4 * w]], dtype=dtype)), (dtype, mx)
        assert torch.equal(mn, torch.tensor([[1, -2 * w], [3, 4]], dtype=dtype)), (dtype, mn)
    zero_d = torch.tensor(float(r))
    dist.all_reduce_max_(zero_d)
    assert float(zero_d) == w - 1
    strided = torch.zeros(3, 4)[:, 1]  # not contiguous: reduced through a copy
    strided += r + 1
    dist.all_reduce_sum_(strided)
    assert strided.tolist() == [3.0, 3.0, 3.0]
    assert dist.all_reduce_scalar(r + 0.5) == sum(i + 0.5 for i in range(w))
    assert dist.all_reduce_scalar(r, "max") == w - 1
    assert dist.all_reduce_scalar(r, "min") == 0
    assert dist.broadcast_object({"choice": r} if r == 0 else None) == {"choice": 0}
    assert dist.broadcast_object(f"rank{r}", src=1) == "rank1"
    parts = dist.all_gather_cat(torch.full((r + 1, 2), float(r)))  # lengths 1 and 2
    assert parts.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_collectives() -> None:
    dist.run_workers(N, _collectives)


# --- split_samples -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 7, 16, 129])
@pytest.mark.parametrize("w", [1, 2, 3, 4, 8])
def test_share_bounds_cover_everything_evenly(n: int, w: int) -> None:
    if n < w:
        with pytest.raises(LowbitError, match=f"at least {w} samples are needed"):
            dist.share_bounds(n, w, 0)
        return
    bounds = [dist.share_bounds(n, w, r) for r in range(w)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def _split(n: int) -> tuple[list[int], str]:
    ids = torch.arange(n * 3).reshape(n, 3)
    mine = dist.split_samples(ids)
    together = dist.all_gather_cat(mine)
    assert torch.equal(together, ids)
    try:
        dist.split_samples(ids[:1])
    except LowbitError as e:
        message = str(e)
    else:
        raise AssertionError("one sample was split across two workers")
    return mine[:, 0].tolist(), message


def test_split_samples_gives_contiguous_shares() -> None:
    rows, message = dist.run_workers(N, _split, 5)
    assert rows == [0, 3, 6]  # rank 0 takes rows 0..2 of 5, rank 1 rows 3..4
    assert "1 calibration sample cannot be split across 2 workers" in message
    assert "at least 2 samples are needed" in message


# --- HessianAccumulator ------------------------------------------------------------------

H_IN = 24


def _hessian_batches() -> list[torch.Tensor]:
    sizes = [(2, 7, H_IN), (3, 5, H_IN), (1, 9, H_IN), (4, 3, H_IN), (2, 2, H_IN)]
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in sizes]


def _hessian() -> tuple[torch.Tensor, int, torch.Tensor]:
    acc = HessianAccumulator(H_IN, dtype=torch.float64)
    for x in _my_batches(_hessian_batches()):
        acc.add(x)
    local = acc.count
    acc.reduce()
    assert acc.count > local  # every rank sees the total
    return acc.sum, acc.count, acc.hessian()


def test_hessian_reduce_equals_one_accumulator_fed_everything() -> None:
    one = HessianAccumulator(H_IN, dtype=torch.float64)
    for x in _hessian_batches():
        one.add(x)
    before = one.sum.clone()
    one.reduce()  # no-op in one process
    assert torch.equal(one.sum, before)
    total, count, h = dist.run_workers(N, _hessian)
    assert count == one.count == 14 + 15 + 9 + 12 + 4
    torch.testing.assert_close(total, one.sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(h, one.hessian(), rtol=1e-6, atol=0)


# --- observers ---------------------------------------------------------------------------


def _fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale = (hi - lo).clamp_min(1e-12) / 15
    return torch.round((x - lo) / scale).clamp(0, 15) * scale + lo


OBSERVER_CASES: dict[str, dict[str, Any]] = {
    "minmax": {},
    "moving_average": {"momentum": 0.1},
    "percentile": {"percentile": 99.0},
    "entropy": {"num_bits": 4, "bins": 64},
    "mse": {"fake_quant": _fake_quant, "grid": 20},
    "percentile_overflowing": {"percentile": 99.0, "max_samples": 100},
}


def _observer(case: str):
    name = "percentile" if case == "percentile_overflowing" else case
    return make_observer(name, **OBSERVER_CASES[case])


def _observer_batches() -> list[torch.Tensor]:
    return _batches(11, 6, (3, 40))


def _observers() -> dict[str, tuple[float, float]]:
    ranges = {}
    mine = _my_batches(_observer_batches())
    for case in OBSERVER_CASES:
        obs = _observer(case)
        for x in mine:
            obs.update(x)
        obs.reduce()
        lo, hi = obs.range()
        ranges[case] = (float(lo), float(hi))
        if case == "percentile_overflowing":
            kept = obs._sample.values
            assert kept is not None and kept.numel() == 100
            everything = torch.cat([x.reshape(-1) for x in _observer_batches()])
            assert torch.isin(kept, everything).all()  # a sample of all ranks' values
    # a rank that saw nothing still takes part, and ends with everyone's range
    late = make_observer("minmax")
    if dist.rank() == 1:
        late.update(torch.tensor([-3.0, 5.0]))
    late.reduce()
    assert [float(v) for v in late.range()] == [-3.0, 5.0]
    return ranges


def test_observer_ranges_equal_single_process() -> None:
    ranges = dist.run_workers(N, _observers)
    for case in OBSERVER_CASES:
        obs = _observer(case)
        for x in _observer_batches():
            obs.update(x)
        lo, hi = (float(v) for v in obs.range())
        if case == "moving_average":  # folded over ranks in float64: equal up to rounding
            assert math.isclose(ranges[case][0], lo, rel_tol=1e-6) and math.isclose(ranges[case][1], hi, rel_tol=1e-6)
        elif case == "percentile_overflowing":  # another uniform sample: inside the data, not equal
            everything = torch.cat([x.reshape(-1) for x in _observer_batches()])
            assert float(everything.min()) <= ranges[case][0] < 0 < ranges[case][1] <= float(everything.max())
        else:  # min / max exactly; sampled observers hold every value, so exactly as well
            assert ranges[case] == (lo, hi), case


# --- KV cache ----------------------------------------------------------------------------

KV_HEADS = 2


def _kv_cases() -> dict[str, Any]:
    from lowbit.scheme import QuantSpec

    return {
        "head": QuantSpec(format="int8", granularity="head", symmetric=False),
        "tensor": QuantSpec(format="int8", granularity="tensor", symmetric=True),
        "head_percentile": QuantSpec(
            format="int8", granularity="head", observer="percentile", observer_args={"percentile": 99.0}
        ),
    }


def _kv_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    keys = _batches(5, 4, (2, KV_HEADS, 6, 8))
    values = _batches(6, 4, (2, KV_HEADS, 6, 8))
    return list(zip(keys, values, strict=True))


def _calibrated(spec: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], reduce: bool) -> dict[str, Any]:
    from lowbit.kvcache import KVQuantizer

    q = KVQuantizer(spec, KV_HEADS)
    q.observing = True
    for k, v in batches:
        q(k, v)
    if reduce:
        q.reduce()
    q.finish_calibration()
    return {kind: (scale.clone(), zp.clone()) for kind, (scale, zp) in q.qparams.items()}


def _kv() -> dict[str, Any]:
    return {name: _calibrated(spec, _my_batches(_kv_batches()), True) for name, spec in _kv_cases().items()}


def test_kv_ranges_equal_single_process() -> None:
    got = dist.run_workers(N, _kv)
    for name, spec in _kv_cases().items():
        want = _calibrated(spec, _kv_batches(), False)
        for kind in ("k", "v"):
            assert torch.equal(got[name][kind][0], want[kind][0]), (name, kind)
            assert torch.equal(got[name][kind][1], want[kind][1]), (name, kind)
