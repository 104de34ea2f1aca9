"""Local lm-eval tasks built from text, with no Hub access: last-word prediction (LAMBADA's form).

``lastword_items`` cuts held-out text into passages whose last word is to be predicted;
``write_lastword_task`` writes them with a task YAML into a directory that ``lowbit eval --tasks
NAME --task-path DIR`` (or ``lm_eval --include_path DIR``) reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

__all__ = ["lastword_items", "write_lastword_task"]

_WORD = re.compile(r"[A-Za-z]{3,}")


def lastword_items(texts: list[str], n: int, context_words: int = 40) -> list[dict[str, str]]:
    """Up to ``n`` passages ``{"context": ..., "target": ...}``: ``context_words`` words of running
    text, then the target, a word of 3+ letters, not all capitals (a play's speaker names are),
    that ends a sentence (followed by ``.``, ``!`` or ``?``). Candidates are taken at evenly
    spaced places through the text (deterministic).

    Our choice where LAMBADA's (human-filtered) selection cannot be copied: the sentence-final
    word, stripped of its punctuation, is scored after the context's last word and a space.
    """
    tokens = [w for t in texts for w in t.split()]
    ends = [
        i
        for i in range(context_words, len(tokens))
        if tokens[i][-1] in ".!?" and _WORD.fullmatch(tokens[i][:-1]) and not tokens[i].isupper()
    ]
    if not ends:
        raise LowbitError(f"no sentence of {context_words}+ words of context ends in a word: give more or other text")
    step = max(1, len(ends) // n)
    picked = ends[::step][:n]
    return [{"context": " ".join(tokens[i - context_words : i]), "target": tokens[i][:-1]} for i in picked]


def write_lastword_task(texts: list[str], out_dir: str | Path, name: str, n: int = 50, context_words: int = 40) -> Path:
    """Write ``NAME.jsonl`` (``lastword_items``) and ``NAME.yaml`` (an lm-eval ``loglikelihood``
    task reading that file by absolute path) into ``out_dir``; returns the YAML's path."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise LowbitError(f"a task name is letters, digits and underscores, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text(
        "".join(json.dumps(item) + "\n" for item in lastword_items(texts, n, context_words)), encoding="utf-8"
    )
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": " {{target}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }
    import yaml

    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
