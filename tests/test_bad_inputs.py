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

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
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
_HELD_LOCKS: list[int] = []  # lock files a row's prepare holds while the row runs (closed by the next one)


def _hold_lock(name: str, pid: int) -> Callable[[World], None]:
    """Another writer of ``name``: its lock file held, as lowbit's own lock holds it, recording ``pid``."""

    def prepare(w: World) -> None:
        while _HELD_LOCKS:
            os.close(_HELD_LOCKS.pop())
        fd = os.open(w.root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{pid}\n".encode())
        _HELD_LOCKS.append(fd)

    return prepare


def _remote_code_model(w: World) -> None:
    """``remote/``: a config whose auto_map points at modeling_x.py, which would damage the world's text."""
    remote = w.root / "remote"
    remote.mkdir()
    auto_map = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps({"model_type": "lowbit-remote-x", "auto_map": auto_map}))
    (remote / "modeling_x.py").write_text(f"open({str(w.text)!r}, 'w').write('remote code ran')\n")


def _full_disk(w: World) -> None:
    """Overwrite a copy of the world's checkpoint on a tmpfs too small for a second one (root only)."""
    from lowbit.checkpoint import load_quantized, save_quantized

    disk = w.root / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in w.ckpt.rglob("*") if p.is_file())
    opts = f"size={int(size * 1.5) // 4096 * 4096 + 4096}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        shutil.copytree(w.ckpt, disk / "q")
        model, tok, meta = load_quantized(disk / "q")
        save_quantized(model, tok, disk / "q", {k: v for k, v in meta.items() if k != "layers"}, overwrite=True)
    finally:
        load_quantized(disk / "q")  # the old checkpoint is intact
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _export(w: World, *extra: str) -> list[str]:
    return ["export", str(w.ckpt), "--format", "gptq", "--quiet", *extra]


ROWS_OUTPUT: list[Bad] = [
    Bad("existing --out without --overwrite", "already exists", argv=lambda w: _quantize(w, "--out", str(w.ckpt))),
    Bad(
        "--overwrite onto a directory lowbit did not write",
        "was not written by lowbit",
        prepare=_write("mine/notes.txt", "my notes"),
        argv=lambda w: _quantize(w, "--out", "mine", "--overwrite"),
    ),
    Bad(
        "--overwrite onto the model directory",
        "is the model itself",
        argv=lambda w: _quantize(w, "--out", str(w.model), "--overwrite"),
    ),
    Bad(
        "export --overwrite onto the model directory",
        "was not written by lowbit",
        argv=lambda w: _export(w, "--out", str(w.model), "--overwrite"),
    ),
    Bad(
        "export --overwrite onto a user's directory",
        "will not replace it",
        prepare=_write("exported/readme.txt", "mine"),
        argv=lambda w: _export(w, "--out", "exported", "--overwrite"),
    ),
    Bad("--out .", "is the current directory", argv=lambda w: _quantize(w, "--out", ".", "--overwrite")),
    Bad("--out ..", "is a parent of the current directory", argv=lambda w: _quantize(w, "--out", "..")),
    Bad("--out /", "is the filesystem root", argv=lambda w: _quantize(w, "--out", "/", "--overwrite")),
    Bad("--out ~", "is your home directory", argv=lambda w: _quantize(w, "--out", "~", "--overwrite")),
    Bad("export --out .", "is the current directory", argv=lambda w: _export(w, "--out", ".", "--overwrite")),
    Bad(
        "--out inside the model directory",
        "inside the model's directory",
        argv=lambda w: _quantize(w, "--out", str(w.model / "q")),
    ),
    Bad(
        "export --out inside the checkpoint",
        "inside the model's directory",
        argv=lambda w: _export(w, "--out", str(w.ckpt / "gptq")),
    ),
    Bad("--out under a file", "is a file, not a directory", argv=lambda w: _quantize(w, "--out", "text.txt/q")),
    Bad("--out where nobody may write", "could not write", argv=lambda w: _quantize(w, "--out", "/proc/lowbit/q")),
    Bad(
        "recipe name ../../x",
        "recipe name '../../x' may not contain",
        prepare=_write("r.yaml", "name: ../../x\npreset: w8a16\n"),
        argv=lambda w: _quantize(w, "--recipe", "r.yaml"),
    ),
    Bad(
        "recipe name with a slash",
        "recipe name 'w8/a16' may not contain",
        prepare=_write("r.yaml", "name: w8/a16\npreset: w8a16\n"),
        argv=lambda w: _quantize(w, "--recipe", "r.yaml"),
    ),
    Bad(
        "recipe file named like a hidden file",
        "recipe name '.mine' may not contain",
        prepare=_write(".mine.yaml", "scheme: {weights: {format: int8, granularity: channel}}\n"),
        argv=lambda w: _quantize(w, "--recipe", ".mine.yaml"),
    ),
    Bad(
        "another run writes the same --out",
        "being written by another lowbit run (process 4242",
        prepare=_hold_lock("q", 4242),
        argv=lambda w: _quantize(w, "--out", "q"),
    ),
    Bad(
        "model that wants to run its own code",
        "pass --trust-remote-code",
        prepare=_remote_code_model,
        argv=lambda w: ["quantize", "remote", "--calib", str(w.text), *CALIB_ARGS, "--no-eval", "--out", "q"],
    ),
    Bad(
        "run a model that wants to run its own code",
        "wants to run its own python code",
        prepare=_remote_code_model,
        argv=lambda w: ["run", "remote", "--prompt", "w1 w2"],
    ),
    Bad(
        "leftover temp dir of a killed run",
        "left behind by an interrupted lowbit run",
        prepare=lambda w: (w.root / ".q.4242.abcd1234.lowbit-tmp").mkdir(),
        argv=lambda w: _quantize(w, "--out", "q"),
        code=0,
    ),
    Bad("full disk while saving", "no space left on device", call=_full_disk),
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
