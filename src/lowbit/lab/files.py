"""Files of a compare directory: atomic writes, and the marker that makes a directory one.

A compare directory is a workspace that later runs reuse (its checkpoints, its stored
evaluations), so it is not replaced as a whole like a checkpoint: each file in it is written
atomically (temp name, fsync, rename), and lowbit writes only into a directory that is new,
empty, or carries the marker ``.lowbit-compare``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowbit.durable import fsync
from lowbit.errors import LowbitError

MARKER = ".lowbit-compare"


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: a temp name beside it, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def prepare_dir(out: Path) -> None:
    """Make ``out`` a compare directory: create it (and its parents), or accept it when it is
    empty or already one (marked). Anything else is refused before any work."""
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file; give a directory for the comparison")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise LowbitError(
            f"--out {out} is not empty and was not written by `lowbit compare` (no {MARKER}); "
            "give a new or empty directory, or the --out of an earlier compare to reuse its work"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).is_file():
            write_text(out / MARKER, json.dumps({"written_by": "lowbit compare"}) + "\n")
    except OSError as exc:
        raise LowbitError(f"cannot write the comparison into {out} ({exc})") from exc
