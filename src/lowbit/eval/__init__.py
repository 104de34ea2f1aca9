"""Evaluation: perplexity, KL divergence and top-1 agreement against a baseline, and text tables."""

from __future__ import annotations

from lowbit.eval.metrics import EvalResult, evaluate
from lowbit.eval.report import format_table

__all__ = ["EvalResult", "evaluate", "format_table"]
