"""The columns the method-family benches (``methods_rptq.py``, ``methods_fpq.py``,
``methods_bcq.py``) print their rows in, and ``methods.py`` gathers: (key, header[, format])."""

from __future__ import annotations

COLUMNS: list[tuple[str, ...]] = [
    ("method", "method"),
    ("variant", "variant"),
    ("baseline_of", "baseline of"),
    ("bits_per_weight", "bits/w", ".3f"),
    ("ppl", "perplexity", ".3f"),
    ("ppl_increase_pct", "ppl +%", "+.2f"),
    ("kl", "KL", ".4f"),
    ("extra", "extra"),
]
