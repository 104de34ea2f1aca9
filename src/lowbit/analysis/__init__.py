"""Analysis of a model's activations and weights, answering the papers' questions (``lowbit analyze``):
outlier features (LLM.int8()), their stability across inputs, INT against FP per layer (MoFQ),
per-cluster activation ranges (RPTQ), and tensor MSE against model error.

Modules: ``capture`` (observe-only hooks), ``outliers``, ``stability``, ``formats_error``,
``clusters``, ``mse_vs_kl`` (the studies, small pure functions), ``run`` (``analyze``: all of
them on one model) and ``report`` (JSON, Markdown, PNG plots).
"""

from __future__ import annotations

from lowbit.analysis.report import write_report
from lowbit.analysis.run import AnalyzeOptions, analyze

__all__ = ["AnalyzeOptions", "analyze", "write_report"]
