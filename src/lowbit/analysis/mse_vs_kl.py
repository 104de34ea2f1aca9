"""Does a lower tensor MSE mean a smaller model error? For each quantized variant (RTN with a
given grid) and each linear: the weight's quantization MSE, and the KL divergence of the model's
next-token distribution when that layer alone is quantized (the others stay float), on a few
sequences; then the Spearman rank correlation of the two across layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.mofq import rank_correlation, ranks
from lowbit.eval.metrics import kl_per_token
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec

__all__ = ["VARIANTS", "Variant", "layer_kls", "ranks", "spearman"]


@dataclass(frozen=True)
class Variant:
    """An RTN grid (min-max ranges) applied to one layer at a time."""

    name: str
    format: str
    symmetric: bool

    def spec(self, in_features: int, group_size: int) -> QuantSpec:
        """The variant in groups of ``group_size``, or per channel where that does not divide ``in_features``."""
        if in_features % group_size == 0 and group_size < in_features:
            return QuantSpec(format=self.format, granularity="group", group_size=group_size, symmetric=self.symmetric)
        return QuantSpec(format=self.format, granularity="channel", group_size=None, symmetric=self.symmetric)


VARIANTS = (
    Variant("int4-sym", "int4", True),
    Variant("int3-asym", "uint3", False),
    Variant("fp4-e2m1", "fp4_e2m1", True),
)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (MoFQ's ``rank_correlation``); None when fewer than 2 values or a constant side."""
    if len(a) != len(b) or len(a) < 2:
        return None
    r = rank_correlation(a, b)
    return None if math.isnan(r) else r


@torch.inference_mode()
def layer_kls(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    ids: torch.Tensor,
    variants: tuple[Variant, ...] = VARIANTS,
    group_size: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Per variant: per layer ``{"layer", "mse", "rel_mse", "kl"}``, the ``spearman`` of MSE against
    KL and ``spearman_relative`` of the relative MSE (MSE / mean squared weight) against KL.
    Each layer's float weight is put back in ``finally``, whatever happens."""
    model.eval()
    base = model(input_ids=ids, use_cache=False).logits.float()
    out: dict[str, Any] = {}
    bar = tqdm(total=len(variants) * len(linears), desc="mse vs kl", disable=not progress, unit="layer")
    for v in variants:
        rows: list[dict[str, Any]] = []
        for name, lin in linears.items():
            w = lin.weight.data
            wq = quantize_weight(w, v.spec(lin.in_features, group_size)).dequantize().to(w.dtype)
            mse = float(((wq.double() - w.double()) ** 2).mean())
            try:
                lin.weight.data = wq
                kl = float(kl_per_token(base, model(input_ids=ids, use_cache=False).logits).mean())
            finally:
                lin.weight.data = w
            rel = mse / max(float((w.double() ** 2).mean()), 1e-30)  # scale-free: MSE / mean square weight
            rows.append({"layer": name, "mse": mse, "rel_mse": rel, "kl": kl})
            bar.update(1)
        kls = [r["kl"] for r in rows]
        out[v.name] = {
            "layers": rows,
            "spearman": spearman([r["mse"] for r in rows], kls),
            "spearman_relative": spearman([r["rel_mse"] for r in rows], kls),
        }
    bar.close()
    return out
