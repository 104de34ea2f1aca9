"""Recovery: how much of the original model's score a quantized model keeps, in percent.

"Give Me BF16 or Give Me Death" reports recovery as quantized score / original score. That
reads directly for metrics where higher is better; for the others lowbit uses the ratio that
keeps "100% = as good as the original, less = worse" (the definitions, one per metric kind):

- ``higher`` (top-1 agreement, generation similarity, task accuracy):
  ``100 * quantized / original``;
- ``lower`` (perplexity): ``100 * original / quantized``, so a perplexity of 11 where the
  original had 10 recovers 90.9%;
- ``log_lower`` (quantities in nats: NLL, KL): ``100 * exp(original - quantized)``. For NLL this
  equals the perplexity recovery (``exp(nll)`` is the perplexity). For KL(original || quantized)
  the original's own value is 0, so the recovery is ``100 * exp(-KL)``: the geometric mean over
  the original's next-token distributions of ``p_quantized / p_original``, the same ratio the
  perplexity recovery takes on the text's tokens, here on tokens drawn from the original.

Metrics that compare a model with the original (KL, top-1 agreement, similarity of
generations) give the original's score as its score against itself (``ORIGINAL_VALUES``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lowbit.errors import LowbitError

__all__ = ["DIRECTIONS", "ORIGINAL_VALUES", "recoveries", "recovery"]

KINDS = ("higher", "lower", "log_lower")

# metric name -> how its recovery is taken; names are the keys of EvalResult.to_dict() and of the
# part-2 metrics (generation similarity, task accuracy), which append here
DIRECTIONS: dict[str, str] = {
    "perplexity": "lower",
    "nll": "log_lower",
    "kl": "log_lower",
    "top1_agreement": "higher",
    "rouge_l": "higher",
    "rouge_l_sampled": "higher",
    "exact_match": "higher",
    "exact_match_sampled": "higher",
    "embedding_similarity": "higher",
    "embedding_similarity_sampled": "higher",
    "accuracy": "higher",
}

# the original's score on metrics measured against the original: its score against itself
ORIGINAL_VALUES: dict[str, float] = {
    "kl": 0.0,
    "top1_agreement": 1.0,
    "rouge_l": 1.0,
    "rouge_l_sampled": 1.0,
    "exact_match": 1.0,
    "exact_match_sampled": 1.0,
    "embedding_similarity": 1.0,
    "embedding_similarity_sampled": 1.0,
}


def recovery(quantized: float, original: float, kind: str) -> float | None:
    """Recovery in percent of one metric (see the module docstring for ``kind``).

    Returns None where the ratio is undefined: a non-finite value, or a zero denominator
    (``higher`` with an original of 0, ``lower`` with a quantized value of 0).
    """
    if kind not in KINDS:
        raise LowbitError(f"recovery kind must be one of {', '.join(KINDS)}, got {kind!r}")
    q, o = float(quantized), float(original)
    if not (math.isfinite(q) and math.isfinite(o)):
        return None
    if kind == "higher":
        return None if o == 0 else 100.0 * q / o
    if kind == "lower":
        return None if q == 0 else 100.0 * o / q
    return 100.0 * math.exp(o - q)


def recoveries(quantized: Mapping[str, object], original: Mapping[str, object]) -> dict[str, float | None]:
    """Recovery of every metric of ``quantized`` that ``DIRECTIONS`` knows, in percent.

    ``quantized``: the quantized model's metrics (e.g. ``{"perplexity": 11.0, "kl": 0.05,
    "top1_agreement": 0.9}``); ``original``: the original model's own scores (``{"perplexity":
    10.0}``). A metric measured against the original takes its original score from
    ``ORIGINAL_VALUES`` unless ``original`` gives one. Metrics missing (or None) on either side
    are left out.
    """
    out: dict[str, float | None] = {}
    for name, kind in DIRECTIONS.items():
        q = quantized.get(name)
        o = original.get(name, ORIGINAL_VALUES.get(name))
        if isinstance(q, int | float) and isinstance(o, int | float) and not isinstance(q, bool):
            out[name] = recovery(q, o, kind)
    return out
