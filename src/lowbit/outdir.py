"""Output directories that lose nothing: written atomically, replaced only when lowbit wrote them.

Every writer (``checkpoint.save_quantized``, ``export.export_model``) goes through ``atomic_dir``:

- the new output is built in a temporary sibling ``.NAME.<pid>.<random>.lowbit-tmp`` and renamed
  into place only when complete, so an interrupted or failed write leaves no half-written output
  and the old one intact; an OS error (a full disk, no permission) becomes a ``LowbitError``;
- every output gets a marker file (``MARKER``); ``overwrite`` replaces only a directory carrying
  it (or an older lowbit checkpoint, see ``is_lowbit_output``), never someone else's directory;
- the current directory, its ancestors, the filesystem root and the home directory are never an
  output;
- a lock file ``.NAME.lock`` next to the output, held with ``fcntl.flock`` while writing, keeps a
  second writer out (the OS releases it when a process dies, so it never goes stale);
- temporary and backup directories left by a killed run (``.NAME.*.lowbit-tmp``, ``.NAME.old-PID``)
  are removed, with a note on stderr, by the next run into the same place, under the lock (so
  their writer is certainly gone);
- a partial run directory ``.NAME.partial`` (``partial_dir``, written by ``lowbit.sink``: the
  finished blocks of a run that may be resumed) is NOT a leftover: an interruption keeps it, and
  only the sink itself replaces it (a run without ``--resume``) or moves it into place
  (``install_dir``) when the run is complete.

``check_output`` does all of these checks (plus a probe that the parent is writable) without
writing anything, so the CLI can refuse a bad ``--out`` before loading a model.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from lowbit.errors import LowbitError

MARKER = ".lowbit-output"  # in every directory lowbit writes; --overwrite replaces only these
_MARKER_TEXT = {"written_by": "lowbit", "note": "lowbit wrote this directory; its --overwrite may replace it"}
TMP_SUFFIX = ".lowbit-tmp"
PARTIAL_SUFFIX = ".partial"  # .NAME.partial: a resumable run's directory (lowbit.sink), kept on failure
_LEGACY_META = "lowbit.json"  # checkpoint.META_FILE (checkpoint imports this module, not the reverse)


def is_lowbit_output(path: str | Path) -> bool:
    """Whether lowbit wrote the directory ``path``, so ``--overwrite`` may replace it.

    A directory with the marker; or one written before the marker existed: a checkpoint whose
    ``lowbit.json`` parses and has a ``layers`` table (older lowbit wrote that file only into its
    checkpoints, with that table). Exports by older versions carry nothing recognisable and are
    treated as foreign: the user removes them once by hand.
    """
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        marker = json.loads((p / MARKER).read_text())
        if isinstance(marker, dict) and marker.get("written_by") == "lowbit":
            return True
    except (OSError, ValueError):
        pass
    try:
        meta = json.loads((p / _LEGACY_META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("layers"), dict)


def _where(place: Callable[[], Path]) -> Path | None:
    """``Path.cwd`` or ``Path.home`` resolved; None when there is none (a removed cwd, no HOME)."""
    try:
        return place().resolve()
    except (OSError, RuntimeError, KeyError):
        return None


def _check_place(out: Path) -> None:
    """Refuse outputs whose replacement would take far more than an output with it."""
    target = out.expanduser().resolve()
    what = None
    if target == Path(target.anchor):
        what = "the filesystem root"
    for place, name in ((_where(Path.cwd), "the current directory"), (_where(Path.home), "your home directory")):
        if what is None and place is not None and place.is_relative_to(target):
            what = name if target == place else f"a parent of {name}"
    if what is not None:
        raise LowbitError(
            f"output {out} is {what}; lowbit writes its output as a new directory and will not write into or "
            "replace this one: give a new directory name, e.g. --out lowbit-out/my-model"
        )


def check_free(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse ``out`` unless it is free: absent, or (with ``overwrite``) a directory lowbit wrote."""
    out = Path(out)
    _check_place(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise LowbitError(f"output {out} already exists; choose another --out or pass {flag}")
    if not out.is_dir():
        raise LowbitError(f"output {out} exists and is not a directory; remove it or choose another --out")
    if not is_lowbit_output(out):
        raise LowbitError(
            f"output {out} exists and was not written by lowbit (it has no {MARKER} marker), so {flag} will not "
            "replace it; choose another --out, or move or delete the directory yourself if you mean to replace it"
        )


def partial_dir(out: str | Path) -> Path:
    """Where a resumable run into ``out`` keeps its finished blocks: ``.NAME.partial`` next to it."""
    out = Path(out)
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def write_marker(directory: Path) -> None:
    """Mark ``directory`` as written by lowbit (so ``--overwrite`` may replace it)."""
    (directory / MARKER).write_text(json.dumps(_MARKER_TEXT) + "\n")


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` (non-blocking): a second writer of the same output gets a clear error.

    The lock file records the holder's pid for that message and is removed on release; a writer that
    opened the file just before it was removed notices (the inode changed) and takes a fresh one.
    """
    path = _lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise LowbitError(
                    f"output {out} is being written by another lowbit run ({who}, holding {path}); wait for it to "
                    "finish, or choose another --out"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        raise LowbitError(_os_message(out, exc, "")) from exc
    try:
        yield
    finally:
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def remove_leftovers(out: Path) -> list[str]:
    """Remove temporary and backup directories of ``out`` left by killed runs; call under its lock.

    Only names that lowbit makes: ``.NAME.<pid>.<random>.lowbit-tmp`` (a write in progress) and
    ``.NAME.old-PID`` holding an earlier lowbit output (the moment between two renames). The lock
    says their writer is gone. A run killed between the two renames left no ``out`` at all: its
    backup is put back in place instead of removed. Returns notes, one per directory.
    """
    name = re.escape(out.name)
    tmp = re.compile(rf"\.{name}\.\d+\.[A-Za-z0-9_]+{re.escape(TMP_SUFFIX)}")
    old = re.compile(rf"\.{name}\.old-\d+")
    notes = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if p.is_symlink() or not p.is_dir():
            continue
        backup = old.fullmatch(p.name) and is_lowbit_output(p)
        if backup and not (out.exists() or out.is_symlink()):
            try:
                os.replace(p, out)
                notes.append(f"put {out} back from {p.name}, where an interrupted lowbit run had moved it")
                continue
            except OSError:
                pass
        if tmp.fullmatch(p.name) or backup:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                notes.append(f"removed {p}, left behind by an interrupted lowbit run")
    return notes


def _say(notes: list[str]) -> None:
    for note in notes:
        print(f"lowbit: note: {note}", file=sys.stderr, flush=True)


def _os_message(out: Path, exc: BaseException, kept: str) -> str:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    hint = "choose an --out in a directory you can write to"
    # safetensors reports the OS error as text
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(exc):
        hint = "free some disk space or choose an --out on another disk"
    return f"could not write {out}: {detail}{where}{kept}; {hint}"


def _probe_writable(out: Path) -> None:
    """Create and remove a directory where ``out`` will be made (the nearest existing ancestor)."""
    parent = out.expanduser().absolute().parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise LowbitError(f"could not write {out}: {parent} is a file, not a directory; choose an --out in a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        raise LowbitError(_os_message(out, exc, "")) from exc


def check_output(out: str | Path, overwrite: bool, *, model_dir: str | Path | None = None) -> None:
    """Every check of an output that needs no model, so a bad ``--out`` fails before any work.

    Not a special place (``.``, an ancestor of it, ``/``, home); not inside the model's directory
    (``model_dir``, when it is a local directory) nor containing it; absent, or with ``overwrite`` a
    directory lowbit wrote; its parent writable; no other run writing it. Leftovers of killed runs
    into the same place are removed here (under the lock), so their space is free for this run.
    """
    out = Path(out)
    _check_place(out)
    if model_dir is not None and Path(model_dir).expanduser().is_dir():
        model = Path(model_dir).expanduser().resolve()
        target = out.expanduser().resolve()
        if target == model:
            raise LowbitError(f"output {out} is the model itself ({model_dir}); choose another --out")
        if target.is_relative_to(model):
            raise LowbitError(
                f"output {out} is inside the model's directory {model_dir}; write the output somewhere else, "
                "e.g. --out lowbit-out/my-model"
            )
        if model.is_relative_to(target):
            raise LowbitError(f"output {out} contains the model {model_dir}; choose another --out")
    _probe_writable(out)
    if out.parent.is_dir():  # otherwise nobody writes there yet, and nothing is left over
        with output_lock(out):
            _say(remove_leftovers(out))  # first: it may put back an output that a killed run moved aside
    check_free(out, overwrite)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it becomes ``out``.

    The marker is written after the body, so writers never see it in their file lists. An OS error
    in the body or the renames becomes a ``LowbitError``; the old output is kept as it was.
    """
    out = Path(out)
    check_free(out, overwrite)
    with output_lock(out):
        _say(remove_leftovers(out))  # first: it may put back an output that a killed run moved aside
        check_free(out, overwrite)  # again under the lock: another run may have finished meanwhile
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=out.parent))
        except OSError as exc:
            raise LowbitError(_os_message(out, exc, "")) from exc
        kept = "; the existing output was left as it was" if out.exists() else ""
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is ordinary user data
            yield tmp
            install_dir(tmp, out)
        except (OSError, SafetensorError) as exc:
            raise LowbitError(_os_message(out, exc, kept)) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def install_dir(tmp: Path, out: Path) -> None:
    """Mark the complete directory ``tmp`` and rename it to ``out`` (call under ``out``'s lock, after
    ``check_free``); an existing ``out`` goes aside first and comes back if the rename fails."""
    if not (tmp / MARKER).is_file():
        write_marker(tmp)
    _replace(tmp, out)


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` goes aside first and comes back on failure."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
