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


def _w(field: str, extra: str = "") -> str:
    """A recipe file: int4 group weights with one more field, and optionally another scheme line."""
    weights = "format: int4, granularity: group" + (f", {field}" if field else "")
    return f"scheme:\n  weights: {{{weights}}}\n" + (f"  {extra}\n" if extra else "")


def _zero_first_norm(w: World) -> None:
    """Layer 0's q/k/v (and so o) see only zeros: their GPTQ Hessians are all zero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w.model)
    model.model.layers[0].input_layernorm.weight.data.zero_()
    model.save_pretrained(w.model)


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
    *(
        Bad(id_, expect, prepare=_write("r.yaml", text), argv=lambda w: _quantize(w, "--recipe", "r.yaml"))
        for id_, expect, text in [
            ("group_size true", "scheme.weights.group_size: expected an integer, got true", _w("group_size: true")),
            ("group_size a string", "group_size: expected an integer, got '64'", _w('group_size: "64"')),
            ("symmetric a string", "symmetric: expected true or false, got 'yes'", _w('symmetric: "yes"')),
            ("observer_args a list", "observer_args: expected a mapping", _w("observer_args: [0.2]")),
            ("group size not dividing", "groups of 64 or 32 divide every targeted width", _w("group_size: 96")),
            ("group size larger than a layer", "groups of 512 are larger than the 128 input", _w("group_size: 512")),
            ("targets match nothing", "'attn.qq_proj' matches no linear layer", _w("", "targets: [attn.qq_proj]")),
            (
                "ignore entry matches nothing (layers listed)",
                "'mlp.nope' matches no linear layer of the model; its linear layers are self_attn.q_proj, "
                "self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, "
                "mlp.down_proj, lm_head (e.g. model.layers.0.self_attn.q_proj)",
                _w("", "ignore: [lm_head, mlp.nope]"),
            ),
            (
                "override regex does not compile",
                "'re:.*(down' is not a valid regular expression",
                _w("", "overrides: [{pattern: 're:.*(down', weights: null}]"),
            ),
            (
                "override pattern matches nothing",
                "'re:.*down_proj_x' matches no linear layer",
                _w("", "overrides: [{pattern: 're:.*down_proj_x', weights: null}]"),
            ),
            ("overrides not a list", "scheme.overrides: expected a list", _w("", "overrides: down_proj")),
            ("override not a mapping", "overrides[0]: expected a mapping", _w("", "overrides: [down_proj]")),
            ("recipe is a YAML list", "expected a mapping", "- preset: w4a16\n"),
            ("recipe is not UTF-8", "is not utf-8 text", b"\xff\xfescheme:\n  weights: {}\n"),
        ]
    ),
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
    Bad(
        "missing evaluation file",
        "text source 'no-eval.txt' does not exist",
        argv=lambda w: ["quantize", str(w.model), "--calib", str(w.text), *CALIB_ARGS, "--eval-data", "no-eval.txt"],
    ),
    Bad(
        "calibration text too short for distinct windows",
        "only 9 distinct windows of 32 tokens; 16 were requested, so samples repeat",
        prepare=_write("short.txt", " ".join(f"w{i}" for i in range(40))),
        argv=lambda w: [*_quantize(w), "--calib", "short.txt", "--samples", "16", "--out", "short-out"],
        code=0,
    ),
    Bad(
        "empty calibration file",
        "'empty.txt' is an empty file",
        prepare=_write("empty.txt", ""),
        argv=lambda w: [*_quantize(w), "--calib", "empty.txt"],
    ),
    Bad(
        "calibration file of another kind",
        "unsupported text file",
        prepare=_write("calib.csv", "text\nw1 w2\n"),
        argv=lambda w: [*_quantize(w), "--calib", "calib.csv"],
    ),
    Bad(
        "calibration directory without .txt",
        "contains no *.txt files",
        prepare=_write("texts/a.md", "w1 w2"),
        argv=lambda w: [*_quantize(w), "--calib", "texts"],
    ),
    Bad(
        "unparsable datasets name", "cannot parse datasets name", argv=lambda w: [*_quantize(w), "--calib", "wikitext:"]
    ),
    Bad(
        "layer that sees no input (zero Hessian)",
        "model.layers.0.self_attn.q_proj: fallback: rtn (Hessian is all zero: the layer saw no input)",
        prepare=_zero_first_norm,
        argv=lambda w: _quantize(w, "--preset", "w4a16", "--out", "zero-out"),
        code=0,
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
