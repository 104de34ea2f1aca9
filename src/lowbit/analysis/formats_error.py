"""INT against FP per layer, at 8 and 4 bits, for weights and for activations (MoFQ's question).

Weights: symmetric round-to-nearest with min-max ranges, INT8 vs FP8 E4M3 per output channel and
INT4 vs FP4 E2M1 in groups (``group_size``; per channel when it does not divide the layer).
Activations: dynamic per-token symmetric, INT8 vs FP8 E4M3 and INT4 vs FP4 E2M1. Each is scored
by the tensor's MSE and by the layer output's MSE on calibration inputs (X W^T against X W_q^T,
or X_q W^T). The pairs have the same bit width and the same scale layout, as MoFQ compares them.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.formats import get_format
from lowbit.primitives import per_token_fake_quantize
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec

__all__ = ["PAIRS", "fake_quant_acts", "fake_quant_weight", "format_errors"]

PAIRS = {8: ("int8", "fp8_e4m3"), 4: ("int4", "fp4_e2m1")}


def fake_quant_weight(w: torch.Tensor, fmt: str, group_size: int | None) -> torch.Tensor:
    """``w`` (out, in) through symmetric RTN in ``fmt``: per channel (``group_size`` None, or one that
    does not divide ``in``) or in groups; float32."""
    if group_size is not None and w.shape[1] % group_size == 0 and group_size < w.shape[1]:
        spec = QuantSpec(format=fmt, granularity="group", group_size=group_size, symmetric=True)
    else:
        spec = QuantSpec(format=fmt, granularity="channel", group_size=None, symmetric=True)
    return quantize_weight(w, spec).dequantize()


def fake_quant_acts(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` (tokens, C) through dynamic per-token symmetric quantization in ``fmt``; float32."""
    return per_token_fake_quantize(x, get_format(fmt), True, "float32")


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def format_errors(w: torch.Tensor, x: torch.Tensor, group_size: int | None = 128) -> dict[str, Any]:
    """For one linear (weight ``w`` (out, in), calibration inputs ``x`` (tokens, in)): per bit width,
    per target (weights, activations), per format the tensor MSE and output MSE, and the winner of each."""
    w = w.detach().float()
    y = x @ w.T
    out: dict[str, Any] = {}
    for bits, pair in PAIRS.items():
        for target in ("weights", "activations"):
            cell: dict[str, Any] = {}
            for fmt in pair:
                if target == "weights":
                    wq = fake_quant_weight(w, fmt, None if bits == 8 else group_size)
                    cell[fmt] = {"tensor_mse": _mse(wq, w), "output_mse": _mse(x @ wq.T, y)}
                else:
                    xq = fake_quant_acts(x, fmt)
                    cell[fmt] = {"tensor_mse": _mse(xq, x), "output_mse": _mse(xq @ w.T, y)}
            for metric in ("tensor_mse", "output_mse"):
                cell[f"{metric}_winner"] = min(pair, key=lambda f, m=metric: cell[f][m])  # type: ignore[misc]
            out[f"{target}_{bits}bit"] = cell
    return out
