"""``bench/adaround_blocks.py --undecided``: the share of weights whose rounding is still soft is
counted from each step's ``h(V)`` (against a plain count here), per rounding variable, and the
counting is undone when the run ends, also when it fails."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lowbit.algorithms.softround as softround
from lowbit.algorithms.rounding import rectified_sigmoid

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_module():  # bench/ is not a package, and the script imports its neighbours
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("adaround_blocks", BENCH / "adaround_blocks.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_undecided_weights_are_counted_per_variable_and_step() -> None:
    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=gen) * 3.0, torch.randn(4, 5, generator=gen) * 3.0
    log: list[list[tuple[int, int]]] = []
    with bench.undecided_counts(log):
        softround.SoftParts.of(a)
        softround.SoftParts.of(b)
        a.mul_(0.1)  # a later step: most of a's weights come back into the soft range
        softround.SoftParts.of(a)

    def plain(v: torch.Tensor) -> tuple[int, int]:
        h = rectified_sigmoid(v)
        return int(((h > 0) & (h < 1)).sum()), v.numel()

    assert log[1] == [plain(b)]
    assert log[0][1] == plain(a) and log[0][0] == plain(a / 0.1)
    assert log[0][0][0] < log[0][1][0]  # the count follows V, it is not the first one kept
    assert bench.undecided_line([log[0]]).split(": ")[1] == (
        f"{log[0][0][0] / 48:.3f} {log[0][1][0] / 48:.3f}"  # steps 0 and the last (1)
    )
    later = torch.zeros(3, 3)
    softround.SoftParts.of(later)  # after the run: not counted
    assert not hasattr(later, "_undecided") and len(log) == 2


def test_counting_is_undone_when_the_run_fails() -> None:
    bench = _bench_module()
    original = softround.SoftParts.of
    with pytest.raises(RuntimeError, match="boom"), bench.undecided_counts([]):
        raise RuntimeError("boom")
    assert softround.SoftParts.of == original
    later = torch.zeros(3, 3)
    softround.SoftParts.of(later)
    assert not hasattr(later, "_undecided")
