"""Output directories lose nothing: the marker rule, the lock, cleanup after killed runs, OS errors,
places that are never an output, and names from recipes that would leave ``lowbit-out``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tiny_models import tiny_llama, token_ids

import lowbit
from lowbit import api, checkpoint, outdir
from lowbit.cli import default_out_dir
from lowbit.errors import LowbitError
from lowbit.outdir import MARKER, atomic_dir, check_output, is_lowbit_output, output_lock
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset
from lowbit.recipes import load_recipe, recipe_from_dict

SRC = str(Path(lowbit.__file__).resolve().parents[1])


def _write(out: Path, files: dict[str, str], overwrite: bool = False) -> None:
    with atomic_dir(out, overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the marker ---------------------------------------------------------------------------------------


def test_marker_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o"
    _write(out, {"a.txt": "1"})
    assert (out / MARKER).is_file() and is_lowbit_output(out)
    _write(out, {"b.txt": "2"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no lock, temp or backup left


def test_overwrite_refuses_a_directory_lowbit_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "weights.bin").write_text("precious")
    (mine / "lowbit.json").write_text('{"note": "a lowbit.json without a layers table"}')
    before = _tree(tmp_path)
    with pytest.raises(LowbitError, match=r"was not written by lowbit.*will not replace it"):
        _write(mine, {"x": "y"}, overwrite=True)
    with pytest.raises(LowbitError, match="was not written by lowbit"):
        check_output(mine, overwrite=True)
    assert _tree(tmp_path) == before


def test_older_checkpoints_count_as_lowbit(tmp_path: Path) -> None:
    """Checkpoints from before the marker: a lowbit.json whose layers table parses."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "lowbit.json").write_text(json.dumps({"format_version": 1, "layers": {}}))
    assert is_lowbit_output(old)
    (old / "lowbit.json").write_text("{not json")
    assert not is_lowbit_output(old)
    (old / MARKER).write_text("something else")
    assert not is_lowbit_output(old)


# ---- places that are never an output ------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_special_places_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool) -> None:
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, what in [
        (".", "the current directory"),
        (str(work), "the current directory"),
        ("..", "a parent of the current directory"),
        ("/", "the filesystem root"),
        (str(tmp_path), "a parent of the current directory"),
    ]:
        with pytest.raises(LowbitError, match=what):
            check_output(out, overwrite)
        with pytest.raises(LowbitError, match=what):
            _write(Path(out), {"x": "y"}, overwrite)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LowbitError, match="your home directory"):
        check_output("~", overwrite)
    with pytest.raises(LowbitError, match="your home directory"):
        check_output(str(home), overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert [p.name for p in home.iterdir()] == ["work"] and not any(work.iterdir())


def test_outputs_in_or_around_the_model_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(LowbitError, match="inside the model's directory"):
        check_output(model / "q", False, model_dir=model)
    with pytest.raises(LowbitError, match="is the model itself"):
        check_output(model, True, model_dir=model)
    with pytest.raises(LowbitError, match="contains the model"):
        check_output(tmp_path, True, model_dir=model / ".")
    check_output(tmp_path / "q", False, model_dir=model)  # a sibling is fine
    check_output(tmp_path / "q", False, model_dir="some/hub-id")  # not a local directory: nothing to check
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_unwritable_parent_is_found_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LowbitError, match="is a file, not a directory"):
        check_output(tmp_path / "file" / "deeper" / "out", False)
    with pytest.raises(LowbitError, match="could not write"):
        check_output("/proc/lowbit-out/q", False)  # not writable, even for root
    check_output(tmp_path / "new" / "deeper" / "out", False)
    assert not (tmp_path / "new").exists()  # the check makes nothing


@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (needs root and mount; skips otherwise)."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_parent(tmp_path: Path) -> None:
    """chmod does not stop root; a read-only mount does."""
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(LowbitError, match=r"could not write.*Read-only file system"):
            check_output(ro / "q", False)
        with pytest.raises(LowbitError, match=r"could not write.*Read-only file system"):
            _write(ro / "q", {"x": "y"})


# ---- the lock -----------------------------------------------------------------------------------------


def test_second_writer_is_kept_out(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with output_lock(out):  # another open file description: conflicts like another process
        with pytest.raises(LowbitError, match=rf"being written by another lowbit run \(process {os.getpid()}"):
            _write(out, {"x": "y"})
        with pytest.raises(LowbitError, match="being written by another lowbit run"):
            check_output(out, False)
        assert not out.exists()
    _write(out, {"x": "y"})  # released
    assert not (tmp_path / ".o.lock").exists()


_HOLDER = """
import sys, time
from pathlib import Path
from lowbit.outdir import atomic_dir
with atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:
    (tmp / "half.bin").write_text("half written")
    print("writing", flush=True)
    time.sleep(600)
"""


def _start_writer(out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def test_lock_of_another_process_and_cleanup_after_it_is_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    _write(out, {"old.txt": "old"})
    before = _tree(out)
    proc = _start_writer(out)
    try:
        with pytest.raises(LowbitError, match=f"process {proc.pid}"):
            _write(out, {"x": "y"}, overwrite=True)
        with pytest.raises(LowbitError, match=f"process {proc.pid}"):
            check_output(out, True)
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(outdir.TMP_SUFFIX)]
        assert len(leftovers) == 1 and f".o.{proc.pid}." in leftovers[0].name  # not removed while it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _tree(out) == before
    capsys.readouterr()
    check_output(out, True)  # the next run finds the killed run's temp dir and removes it
    assert "left behind by an interrupted lowbit run" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_leftovers_are_removed_by_the_next_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    _write(out, {"x": "0"})
    (tmp_path / ".o.4242.abcd1234.lowbit-tmp").mkdir()  # a killed write
    backup = tmp_path / ".o.old-4242"  # killed between the two renames
    backup.mkdir()
    (backup / MARKER).write_text('{"written_by": "lowbit"}')
    keep = [".o.old-4243", ".o.v2.lowbit-tmp", ".oo.4242.abcd1234.lowbit-tmp", ".o.notes"]
    for name in keep:  # not lowbit's (no marker), or not this output's
        (tmp_path / name).mkdir()
    _write(out, {"x": "y"}, overwrite=True)
    err = capsys.readouterr().err
    assert err.count("left behind by an interrupted lowbit run") == 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", *keep])


def test_output_moved_aside_by_a_killed_run_is_put_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Killed between the two renames: the old output is only in .NAME.old-PID, and comes back."""
    out = tmp_path / "o"
    _write(out, {"old.txt": "old"})
    before = _tree(out)
    out.rename(tmp_path / ".o.old-4242")
    (tmp_path / ".o.4242.abcd1234.lowbit-tmp").mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        check_output(out, False)  # the old output is back, so a new one needs --overwrite
    assert "put " in capsys.readouterr().err
    assert _tree(out) == before
    out.rename(tmp_path / ".o.old-4243")
    with pytest.raises(LowbitError, match="already exists"):
        _write(out, {"new.txt": "new"})  # the writer itself does the same
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ---- OS errors ----------------------------------------------------------------------------------------


def test_os_error_in_the_rename_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    _write(out, {"old.txt": "old"})
    before = _tree(out)
    real = os.replace
    calls = []

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(src)
        if len(calls) == 2:  # the new output into place
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    with pytest.raises(LowbitError, match=r"No space left on device.*left as it was.*free some disk space"):
        _write(out, {"new.txt": "new"}, overwrite=True)
    monkeypatch.undo()
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_full_disk_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    """A real full disk: a tmpfs that holds one checkpoint but not two."""
    model = tiny_llama()
    report = quantize_model(model, get_preset("w4a16-rtn"), token_ids(2, 16), batch_size=2, progress=False)
    first = api.save_quantized(model, None, tmp_path / "first", report)
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    with _tmpfs(tmp_path / "disk", f"size={int(size * 1.5) // 4096 * 4096 + 4096}") as disk:
        shutil.copytree(first, disk / "q")
        before = _tree(disk / "q")
        with pytest.raises(LowbitError, match=r"could not write.*No space left.*left as it was"):
            checkpoint.save_quantized(model, None, disk / "q", {}, overwrite=True)
        assert _tree(disk / "q") == before
        assert sorted(p.name for p in disk.iterdir()) == ["q"]
        checkpoint.load_quantized(disk / "q")  # still loads


# ---- names from recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "a\\b", ".."])
def test_recipe_names_that_are_paths_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="may not contain"):
        recipe_from_dict({"preset": "w4a16", "name": name})
    (tmp_path / ".w4.yaml").write_text("scheme: {weights: {format: int4, granularity: channel}}\n")  # named by its stem
    with pytest.raises(LowbitError, match=r"'\.w4' may not contain"):
        load_recipe(tmp_path / ".w4.yaml")


@pytest.mark.parametrize("recipe", ["../../x", "a/b", "/etc"])
def test_default_out_dir_stays_in_lowbit_out(recipe: str) -> None:
    with pytest.raises(LowbitError, match="would not lie directly inside lowbit-out"):
        default_out_dir("./my-model", recipe)
    assert default_out_dir("./my-model", "w4a16") == Path("lowbit-out/my-model-w4a16")
