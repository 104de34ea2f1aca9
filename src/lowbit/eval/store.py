"""Evaluation results stored in the checkpoint they measure: ``CKPT/eval/<key>.json``.

``lowbit eval`` and ``lowbit compare`` write every result of a lowbit checkpoint here (atomically:
temp file, fsync, rename), and read one back instead of evaluating again when the settings match.
The key is the first 16 hex digits of the SHA-256 of the settings (canonical JSON): the evaluation
text's name and the SHA-256 of its token windows (so a changed text or tokenizer is a new key),
the number and length of the windows, the baseline and the batch size. A stored result also
names the checkpoint it measured (the SHA-256 of its ``lowbit.json``, which holds the hashes of
every other file), so a result is never read back for a checkpoint quantized again in place.

The record: ``{"key", "settings", "checkpoint", "metrics", "versions", "time"}``; ``metrics``
is ``EvalResult.to_dict()`` plus whatever else was measured (part-2 metrics).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

from lowbit.data import LowbitWarning
from lowbit.durable import normalized, write_json

__all__ = [
    "EVAL_DIR",
    "checkpoint_id",
    "eval_settings",
    "load_result",
    "model_identity",
    "save_result",
    "settings_key",
    "versions",
    "windows_sha256",
]

EVAL_DIR = "eval"
_META = "lowbit.json"  # checkpoint.META_FILE (not imported: the store needs no checkpoint code)
RECORD_VERSION = 1


def windows_sha256(windows: torch.Tensor) -> str:
    """SHA-256 of (n, T) token ids as little-endian int64, row by row."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def model_identity(spec: str | None) -> str | None:
    """How a model spec is recorded: an existing local path as an absolute path, else as given
    (a Hub id, ``demo``). None stays None (no baseline)."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def eval_settings(
    data: str, windows: torch.Tensor, baseline: str | None, batch_size: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The settings an evaluation's numbers depend on; ``extra`` adds more (e.g. part-2 options).

    ``windows``: (n_windows, seq_len) int token ids. ``data`` is the source's name as given
    (``demo``, a path made absolute, a datasets name)."""
    settings: dict[str, Any] = {
        "data": model_identity(data),
        "windows_sha256": windows_sha256(windows),
        "n_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "baseline": model_identity(baseline),
        "batch_size": int(batch_size),
    }
    settings.update(extra or {})
    return normalized(settings, "the evaluation settings")


def settings_key(settings: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``settings`` as canonical JSON (sorted keys)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_id(ckpt: str | Path) -> str | None:
    """SHA-256 of the checkpoint's ``lowbit.json``; None when it has none (not a checkpoint)."""
    try:
        return hashlib.sha256((Path(ckpt) / _META).read_bytes()).hexdigest()
    except OSError:
        return None


def versions() -> dict[str, str]:
    """Versions of what produced a number: lowbit, torch, transformers, Python."""
    import transformers

    from lowbit import __version__

    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def result_path(ckpt: str | Path, settings: dict[str, Any]) -> Path:
    return Path(ckpt) / EVAL_DIR / f"{settings_key(settings)}.json"


def save_result(ckpt: str | Path, settings: dict[str, Any], metrics: dict[str, Any]) -> Path | None:
    """Write ``metrics`` for ``settings`` into ``ckpt/eval/<key>.json`` atomically; returns the
    path. A directory that is not a lowbit checkpoint, or that cannot be written (read-only),
    stores nothing: None, with a warning for the second."""
    ident = checkpoint_id(ckpt)
    if ident is None:
        return None
    path = result_path(ckpt, settings)
    record = {
        "format": RECORD_VERSION,
        "key": path.stem,
        "settings": settings,
        "checkpoint": ident,
        "metrics": normalized(metrics, "the evaluation metrics"),
        "versions": versions(),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        path.parent.mkdir(exist_ok=True)
        write_json(path, record)
    except OSError as exc:
        warnings.warn(
            f"could not store the evaluation in {path} ({exc}); it was not saved", LowbitWarning, stacklevel=2
        )
        return None
    return path


def load_result(ckpt: str | Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record for ``settings`` in ``ckpt``, or None: none stored, unreadable, other
    settings (a key collision), or written for another checkpoint in the same place."""
    path = result_path(ckpt, settings)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_VERSION:
        return None
    if record.get("settings") != settings or record.get("checkpoint") != checkpoint_id(ckpt):
        return None
    if not isinstance(record.get("metrics"), dict):
        return None
    return record
