"""Write an output directory atomically: build it in a temporary sibling, rename it into place.

An interrupted or failed write leaves no half-written output, and an existing output is only
replaced (with ``overwrite``) once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def check_free(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an existing ``out`` unless ``overwrite``; say how to proceed."""
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists; choose another --out or pass {flag}")
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output {out} exists and is not a directory; remove it or choose another --out")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; on success it becomes ``out``."""
    out = Path(out)
    check_free(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise LowbitError(f"could not write {out} ({exc})") from exc
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is ordinary user data
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
