"""Perplexity, KL divergence and top-1 agreement of a causal LM, optionally against a baseline model.

Every window is scored independently: the logits at positions ``0..T-2`` predict tokens ``1..T-1``.
All log-softmaxes are taken in float32. With a baseline, both models run on the same batch and only
per-position scalars are kept, so no full-vocabulary logits for the whole set are ever held.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit import defaults
from lowbit.errors import LowbitError

__all__ = ["EvalResult", "evaluate", "kl_per_token", "token_nll", "top1_match"]


@dataclass
class EvalResult:
    """Summary of one evaluation run (all averages are over predicted tokens)."""

    perplexity: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood, nats/token
    kl: float | None  # mean KL(P_baseline || P_model), nats/token; None without a baseline
    top1_agreement: float | None  # fraction of positions whose argmax agrees; None without a baseline
    n_windows: int
    seq_len: int
    n_tokens: int  # predicted tokens = n_windows * (seq_len - 1)
    seconds: float
    baseline_perplexity: float | None = None  # the baseline's own perplexity on the same windows

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if logits.dim() != 3 or logits.shape[1] < 2:
        raise LowbitError(f"{name} must have shape (batch, seq_len >= 2, vocab), got {tuple(logits.shape)}.")


def _check_pair(logits_base: torch.Tensor, logits_model: torch.Tensor) -> None:
    _check_logits(logits_base, "baseline logits")
    _check_logits(logits_model, "model logits")
    if logits_base.shape != logits_model.shape:
        raise LowbitError(
            f"baseline logits {tuple(logits_base.shape)} and model logits {tuple(logits_model.shape)} differ "
            "in shape; compare models that share a tokenizer and vocabulary size."
        )


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood.

    Args:
        logits: (B, T, V), any float dtype; position t predicts token t+1.
        ids: (B, T) integer token ids.

    Returns:
        (B, T-1) float32: ``-log softmax(logits[:, t])[ids[:, t+1]]`` for t in 0..T-2.
    """
    _check_logits(logits, "logits")
    if ids.shape != logits.shape[:2]:
        raise LowbitError(f"ids shape {tuple(ids.shape)} does not match logits {tuple(logits.shape)}.")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:].to(device=logp.device, dtype=torch.int64).unsqueeze(-1)
    return -logp.gather(-1, target).squeeze(-1)


def kl_per_token(logits_base: torch.Tensor, logits_model: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_model) per position, in nats, on the first T-1 positions.

    Args:
        logits_base, logits_model: (B, T, V), same shape, any float dtype.

    Returns:
        (B, T-1) float32: ``sum_v p_base * (log p_base - log p_model)``.
    """
    _check_pair(logits_base, logits_model)
    lp_base = F.log_softmax(logits_base[:, :-1].float(), dim=-1)
    lp_model = F.log_softmax(logits_model[:, :-1].float().to(lp_base.device), dim=-1)
    return (lp_base.exp() * (lp_base - lp_model)).sum(-1)


def top1_match(logits_base: torch.Tensor, logits_model: torch.Tensor) -> torch.Tensor:
    """Whether both models' most likely next token agrees.

    Args:
        logits_base, logits_model: (B, T, V), same shape.

    Returns:
        (B, T-1) bool, on the first T-1 positions.
    """
    _check_pair(logits_base, logits_model)
    a = logits_base[:, :-1].argmax(-1)
    return a == logits_model[:, :-1].argmax(-1).to(a.device)


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_windows(windows: object, batch_size: int) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor):
        raise LowbitError(f"windows must be a torch.Tensor of token ids, got {type(windows).__name__}.")
    if windows.dim() != 2:
        raise LowbitError(f"windows must be 2-D (n_windows, seq_len), got shape {tuple(windows.shape)}.")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise LowbitError(f"windows must hold integer token ids, got dtype {windows.dtype}.")
    if windows.shape[0] == 0:
        raise LowbitError("no evaluation windows: the text is shorter than one window; use more text.")
    if windows.shape[1] < 2:
        raise LowbitError(f"seq_len must be at least 2 to predict a token, got {windows.shape[1]}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LowbitError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return windows.to(torch.int64)


def _check_vocab(model: torch.nn.Module, windows: torch.Tensor, name: str) -> None:
    lo, hi = int(windows.min()), int(windows.max())
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    n_vocab = getattr(emb, "num_embeddings", None)
    if lo < 0 or (isinstance(n_vocab, int) and hi >= n_vocab):
        raise LowbitError(
            f"token ids range over [{lo}, {hi}] but the {name} has {n_vocab} embeddings; "
            "tokenize the text with this model's own tokenizer."
        )


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch.to(_device_of(model)), use_cache=False).logits


def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    baseline: torch.nn.Module | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Score ``model`` on token windows; with ``baseline``, also KL and top-1 agreement against it.

    Args:
        model: a causal LM called as ``model(input_ids=..., use_cache=False).logits`` -> (B, T, V).
        windows: (n_windows, seq_len) integer token ids; each row is scored independently.
        baseline: None, or a reference model with the same vocabulary, run on the same batches.
        batch_size: windows per forward pass.
        progress: show a tqdm bar.
        desc: label for the progress bar.

    Returns:
        EvalResult. Sums are accumulated in float64 over positions 1..T-1 of every window.

    Raises:
        LowbitError: windows empty, not 2-D integer, seq_len < 2, ids outside the vocabulary,
            or the two models' logits differ in shape.
    """
    ids = _check_windows(windows, batch_size)
    n, seq_len = ids.shape
    _check_vocab(model, ids, "model")
    models = [model] if baseline is None else [model, baseline]
    if baseline is not None:
        _check_vocab(baseline, ids, "baseline")
    for m in models:
        m.eval()

    nll_sum = kl_sum = base_nll_sum = 0.0
    agree = 0
    start = time.perf_counter()
    with torch.inference_mode():
        bar = tqdm(total=n, desc=desc, disable=not progress, unit="window")
        for i in range(0, n, batch_size):
            batch = ids[i : i + batch_size]
            logits = _logits(model, batch)
            base = None if baseline is None else _logits(baseline, batch)
            # Reduce one window at a time to bound float32 temporaries to a single (T, V) slice.
            for r in range(batch.shape[0]):
                row = logits[r : r + 1]
                nll_sum += token_nll(row, batch[r : r + 1]).double().sum().item()
                if base is not None:
                    base_nll_sum += token_nll(base[r : r + 1], batch[r : r + 1]).double().sum().item()
                    kl_sum += kl_per_token(base[r : r + 1], row).double().sum().item()
                    agree += int(top1_match(base[r : r + 1], row).sum().item())
            del logits, base
            bar.update(batch.shape[0])
        bar.close()
    seconds = time.perf_counter() - start

    n_tokens = n * (seq_len - 1)
    nll = nll_sum / n_tokens
    base_nll = base_nll_sum / n_tokens
    return EvalResult(
        perplexity=_ppl(nll),
        nll=nll,
        kl=None if baseline is None else kl_sum / n_tokens,
        top1_agreement=None if baseline is None else agree / n_tokens,
        n_windows=n,
        seq_len=seq_len,
        n_tokens=n_tokens,
        seconds=seconds,
        baseline_perplexity=None if baseline is None else _ppl(base_nll),
    )


def _ppl(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf
