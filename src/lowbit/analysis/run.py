"""``lowbit analyze``: one model, calibration text (and optional text domains) -> the answers of
``outliers``, ``stability``, ``formats_error``, ``clusters`` and ``mse_vs_kl`` as one dict.

Observe-only: hooks record inputs and are removed after each pass; the MSE-vs-KL study swaps one
layer's weight at a time and always restores it. No weight of the model is left changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.analysis.capture import LinearStats, block_linears, capture_stats
from lowbit.analysis.clusters import cluster_losses
from lowbit.analysis.formats_error import format_errors
from lowbit.analysis.mse_vs_kl import layer_kls
from lowbit.analysis.outliers import large_channels, outlier_features
from lowbit.analysis.stability import stability
from lowbit.errors import LowbitError

__all__ = ["AnalyzeOptions", "analyze", "disjoint_windows", "merge_stats"]


@dataclass(frozen=True)
class AnalyzeOptions:
    samples: int = 16  # calibration windows, split into two disjoint halves
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 4
    top_k: int = 8  # channels per layer compared across inputs
    keep_tokens: int = 256  # input rows kept per layer for the format and cluster errors
    clusters: tuple[int, ...] = (1, 2, 4, 8, 16)
    group_size: int | None = None  # None: the largest of 128, 64, 32 dividing every layer
    kl_sequences: int = 2
    kl_layers: int | None = None  # None: every linear; 0: skip the MSE-vs-KL study
    threshold: float = 6.0  # LLM.int8()'s magnitude
    domains: tuple[str, ...] = field(default_factory=tuple)


def disjoint_windows(tokenizer: Any, source: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` non-overlapping windows (n, seq_len) of the calibration split of ``source``, drawn without
    replacement from its consecutive windows (seeded), so any two rows share no text."""
    from lowbit.data import load_texts, tokenize_texts

    stream = tokenize_texts(tokenizer, load_texts(source, "calib"))
    available = stream.numel() // seq_len
    if available < n:
        raise LowbitError(
            f"{source!r} holds {stream.numel()} tokens: {available} windows of {seq_len}, fewer than the {n} "
            "needed; give more text, fewer --samples or a shorter --seq-len"
        )
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return stream[(pick * seq_len)[:, None] + torch.arange(seq_len)[None, :]].clone()


def merge_stats(a: dict[str, LinearStats], b: dict[str, LinearStats]) -> dict[str, LinearStats]:
    """Statistics of the union of two captures (samples from ``a`` first)."""
    out = {}
    for name, sa in a.items():
        sb = b[name]
        keep = max(sa.sample.shape[0], sb.sample.shape[0])
        out[name] = LinearStats(
            torch.maximum(sa.absmax, sb.absmax),
            sa.big + sb.big,
            torch.minimum(sa.cmin, sb.cmin),
            torch.maximum(sa.cmax, sb.cmax),
            sa.n_tokens + sb.n_tokens,
            torch.cat([sa.sample, sb.sample])[:keep],
        )
    return out


def _group_size(linears: dict[str, nn.Linear], asked: int | None) -> int:
    if asked:
        return asked
    widths = {m.in_features for m in linears.values()}
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 128)


def _spread(names: list[str], n: int | None) -> list[str]:
    if n is None or n >= len(names):
        return names
    return [names[i * len(names) // n] for i in range(n)]


def analyze(
    model: nn.Module, tokenizer: Any, calib: str, options: AnalyzeOptions, progress: bool = True
) -> dict[str, Any]:
    """Every study on ``model`` with calibration text ``calib``; a JSON-ready dict (see ``report``)."""
    o = options
    if o.samples < 2:
        raise LowbitError("analyze needs at least 2 calibration samples (two disjoint halves are compared)")
    linears = block_linears(model)
    if not linears:
        raise LowbitError("the model has no linear layers inside its decoder blocks to analyze")
    ids = disjoint_windows(tokenizer, calib, o.samples, o.seq_len, o.seed)

    def observe(rows: torch.Tensor, desc: str, keep: int = o.keep_tokens) -> dict[str, LinearStats]:
        return capture_stats(model, rows, o.batch_size, keep, o.threshold, progress, desc)

    half_a = observe(ids[0::2], "observe (half A)")
    half_b = observe(ids[1::2], "observe (half B)")
    full = merge_stats(half_a, half_b)
    group = _group_size(linears, o.group_size)

    layers = []
    for name, s in tqdm(full.items(), desc="formats and clusters", disable=not progress, unit="layer"):
        large = large_channels(s)
        top = sorted(range(s.absmax.numel()), key=lambda c: -float(s.absmax[c]))[: o.top_k]
        layers.append(
            {
                "layer": name,
                "max_abs": float(s.absmax.max()),
                "large_channels": large,
                "top_channels": top,
                "formats": format_errors(linears[name].weight, s.sample, group),
                "clusters": cluster_losses(s.sample, s.cmin, s.cmax, list(o.clusters), seed=o.seed),
            }
        )

    domains = []
    if len(o.domains) >= 2:
        dstats = [
            observe(disjoint_windows(tokenizer, d, max(1, o.samples // 2), o.seq_len, o.seed), f"observe ({d})", 0)
            for d in o.domains
        ]
        for i in range(len(o.domains)):
            for j in range(i + 1, len(o.domains)):
                domains.append(
                    {"a": o.domains[i], "b": o.domains[j], "layers": stability(dstats[i], dstats[j], o.top_k)}
                )

    kl: dict[str, Any] = {}
    if o.kl_layers != 0:
        chosen = {n: linears[n] for n in _spread(list(linears), o.kl_layers)}
        kl = layer_kls(model, chosen, ids[: o.kl_sequences], group_size=group, progress=progress)

    return {
        "settings": {
            "calib": calib,
            "samples": o.samples,
            "seq_len": o.seq_len,
            "seed": o.seed,
            "top_k": o.top_k,
            "threshold": o.threshold,
            "group_size": group,
            "keep_tokens": o.keep_tokens,
            "clusters": list(o.clusters),
            "kl_sequences": o.kl_sequences,
            "domains": list(o.domains),
        },
        "outlier_features": outlier_features(full),
        "layers": layers,
        "stability_subsets": stability(half_a, half_b, o.top_k),
        "stability_domains": domains,
        "mse_vs_kl": kl,
    }
