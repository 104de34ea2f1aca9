"""Bad inputs, as a user gives them: each row is an input, a fragment of the message lowbit must
print, and the promise that nothing that existed before was changed or lost.

Every row runs in its own copy of a tiny offline world (``tests/world.py``: a saved model, a text
file, a lowbit checkpoint) with the working directory at its root. A row either runs the command
line (``argv``) and expects exit code ``code`` (2: a clear error, no traceback; 0: the run goes on
and ``expect`` is a warning on stderr), or calls Python (``call``) and expects a ``LowbitError``.
After the row, every file that existed before it ran has the same bytes.

The rows are grouped by the part of lowbit that catches them; each group is its own list, so
the groups can grow independently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from world import CALIB_ARGS, World, build_world, copy_world, run_cli

import lowbit.models
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Bad:
    id: str
    expect: str  # a fragment of the message (case-insensitive)
    argv: Callable[[World], list[str]] | None = None  # command line, given the world
    call: Callable[[World], Any] | None = None  # or Python that must raise LowbitError
    prepare: Callable[[World], None] | None = None  # damage the world before the row runs
    code: int = 2  # exit code of argv rows; 0 means a warning, not a refusal


def _quantize(w: World, *extra: str) -> list[str]:
    """``lowbit quantize`` of the world's model on its text, small and fast, no evaluation."""
    return ["quantize", str(w.model), "--calib", str(w.text), *CALIB_ARGS, "--no-eval", "--quiet", *extra]


def _write(rel: str, text: str | bytes) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        path = w.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return prepare


# --- command line and recipes -----------------------------------------------------------------------
ROWS_RECIPE: list[Bad] = [
    Bad("unknown preset", "unknown preset 'w5a5'", argv=lambda w: _quantize(w, "--preset", "w5a5")),
    Bad(
        "misspelled recipe field",
        "did you mean 'group_size'",
        prepare=_write("r.yaml", "scheme:\n  weights: {format: int4, granularity: group, groupsize: 64}\n"),
        argv=lambda w: _quantize(w, "--recipe", "r.yaml"),
    ),
    Bad("zero samples", "expected a positive integer", argv=lambda w: [*_quantize(w), "--samples", "0"]),
]

# --- where output goes ------------------------------------------------------------------------------
ROWS_OUTPUT: list[Bad] = [
    Bad("existing --out without --overwrite", "already exists", argv=lambda w: _quantize(w, "--out", str(w.model))),
]

# --- models, checkpoints and exports ----------------------------------------------------------------
ROWS_CHECKPOINT: list[Bad] = [
    Bad("missing model directory", "does not exist", argv=lambda w: ["quantize", "./no-such-model", "--no-eval"]),
]

# --- data and numerics --------------------------------------------------------------------------------
ROWS_DATA: list[Bad] = [
    Bad(
        "missing calibration file",
        "text source 'no-such.txt' does not exist",
        argv=lambda w: [*_quantize(w), "--calib", "no-such.txt"],
    ),
]

ROWS = ROWS_RECIPE + ROWS_OUTPUT + ROWS_CHECKPOINT + ROWS_DATA


@pytest.fixture(autouse=True)
def _no_demo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))

    def refuse() -> Path:
        raise AssertionError("a bad-input row tried to fetch the demo model")

    monkeypatch.setattr(lowbit.models, "fetch_demo_model", refuse)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("template"))


@pytest.fixture
def world(template: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = copy_world(template, tmp_path / "world")
    monkeypatch.chdir(w.root)
    yield w


def _snapshot(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_enough_rows() -> None:
    assert len(ROWS) >= 40, len(ROWS)
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Bad, world: World) -> None:
    if row.prepare is not None:
        row.prepare(world)
    before = _snapshot(world.root)
    if row.call is not None:
        with pytest.raises(LowbitError) as exc:
            row.call(world)
        message = str(exc.value)
    else:
        assert row.argv is not None
        rc, _, message = run_cli(row.argv(world))
        assert rc == row.code, message
        assert "Traceback" not in message, message
    assert row.expect.lower() in message.lower(), message
    after = _snapshot(world.root)
    changed = [str(p.relative_to(world.root)) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"files changed or lost: {changed}"
