"""``bench/adaround_blocks.py --undecided``: the share of weights whose rounding is still soft is
counted from each step's ``h(V)`` (against a plain count here), per block and rounding variable,
and the counting is undone when the run ends, also when it fails."""

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


def _plain(v: torch.Tensor) -> tuple[int, int]:
    h = rectified_sigmoid(v)
    return int(((h > 0) & (h < 1)).sum()), v.numel()


def test_undecided_weights_are_counted_per_block_variable_and_step() -> None:
    bench = _bench_module()
    gen = torch.Generator().manual_seed(0)
    a1, a2, b1 = (torch.randn(shape, generator=gen) * 3.0 for shape in [(6, 8), (4, 5), (3, 7)])
    expected_a1 = [_plain(a1), _plain(a1 * 0.1)]
    blocks: list[list[list[tuple[int, int]]]] = []
    with bench.undecided_counts(blocks):
        for v in (a1, a2):  # block A, step 0: its variables first appear together
            softround.SoftParts.of(v)
        a1.mul_(0.1)  # a step: most of a1's weights come back into the soft range
        for v in (a1, a2):  # block A, step 1
            softround.SoftParts.of(v)
        softround.SoftParts.of(b1)  # a new variable after a repeat: block B
        softround.SoftParts.of(b1)

    assert blocks == [[expected_a1, [_plain(a2)] * 2], [[_plain(b1)] * 2]]
    assert expected_a1[0][0] < expected_a1[1][0]  # the count follows V
    shares = [(expected_a1[i][0] + _plain(a2)[0]) / 68 for i in (0, 1)]  # steps 0 and the last (1)
    assert bench.undecided_line(blocks[0]).split(": ")[1] == " ".join(f"{x:.3f}" for x in shares)
    later = torch.zeros(3, 3)
    softround.SoftParts.of(later)  # after the run: not counted
    assert not hasattr(later, "_undecided") and len(blocks) == 2


def test_counting_is_undone_when_the_run_fails() -> None:
    bench = _bench_module()
    original = softround.SoftParts.of
    with pytest.raises(RuntimeError, match="boom"), bench.undecided_counts([]):
        raise RuntimeError("boom")
    assert softround.SoftParts.of == original
    later = torch.zeros(3, 3)
    softround.SoftParts.of(later)
    assert not hasattr(later, "_undecided")
