"""Loader for lowbit's example lm-eval tasks: a JSONL file next to this one, as a ``test`` split.

lm-eval resolves ``custom_dataset: !function jsonl_data.load`` relative to the task's YAML and
calls it with the task's ``dataset_kwargs`` (and ``metadata``), so the tasks need no Hub access
and no path relative to the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(file: str, **_: Any) -> Any:
    """``{"test": Dataset}`` of the objects in ``file`` (a JSONL path, relative to this directory)."""
    import datasets

    path = Path(__file__).parent / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
