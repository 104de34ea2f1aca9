"""ZeroQuant-FP (Wu et al., 2023): FP4 weights for FP8 activations, and LoRC (ZeroQuant-V2).

``zqfp`` rounds each target's weight to its spec (FP4 E2M1 with power-of-two scales in the
``w4a8-fp`` presets) and checks the point of the power-of-two restriction: every weight casts to
FP8 E4M3 by exponent arithmetic alone (``lowbit.fpcast``), so an FP8 matmul can take it without
dequantizing. The report gives, per layer, ``fp8_castable`` (1 or 0) and the scale exponents'
range. The paper runs GPTQ before; here the weights are rounded to nearest (a recipe may put
``gptq`` in its place: the cast check is what this step adds).

``lorc`` (after any quantizer step) adds LoRC's rank-``rank`` fp16 factors of each weight's error
``W - W^`` (``lowbit.lorc``); the report gives the weight's relative error before and after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.errors import LowbitError
from lowbit.fpcast import fp8_weight
from lowbit.lorc import lorc_factors
from lowbit.qweight import QuantizedWeight, quantize_weight


@register("zqfp", kind="quantizer")
@dataclass
class ZeroQuantFP(Algorithm):
    needs = frozenset()  # the weights alone
    data_parallel = True

    def apply(self, ctx: BlockContext) -> None:
        for name, linear in ctx.targets.items():
            wspec = ctx.specs[name][0]
            if wspec is None:
                continue
            try:
                qw = quantize_weight(linear.weight, wspec)
            except LowbitError as e:
                raise LowbitError(f"{ctx.prefix}.{name}: {e}") from None
            ctx.qweights[name] = qw
            stats = ctx.stats.setdefault(name, {})
            castable = wspec.format == "fp4_e2m1" and wspec.scale_dtype == "pow2"
            if castable:
                try:
                    fp8_weight(qw.codes, qw.scale, qw.g_idx)
                except LowbitError:
                    castable = False
                exps = torch.frexp(qw.scale.to(torch.float32))[1] - 1
                stats["scale_exp_min"], stats["scale_exp_max"] = float(exps.min()), float(exps.max())
            stats["fp8_castable"] = float(castable)


@register("lorc", kind="quantizer")
@dataclass
class LoRC(Algorithm):
    rank: int = 8
    needs = frozenset()
    data_parallel = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer (e.g. 8), got {self.rank!r}")

    def apply(self, ctx: BlockContext) -> None:
        quantized = [n for n in ctx.targets if n in ctx.qweights]
        if not quantized and any(w is not None for w, _ in ctx.specs.values()):
            raise LowbitError("the lorc step compensates quantized weights: put it after a quantizer (rtn, zqfp, gptq)")
        for name in quantized:
            current = ctx.qweights[name]
            if not isinstance(current, QuantizedWeight):
                raise LowbitError(f"{ctx.prefix}.{name}: lorc compensates grid weights, not {type(current).__name__}")
            qw = dataclasses.replace(current, lorc_u=None, lorc_v=None)
            w = ctx.targets[name].weight.detach().to(torch.float32)
            error = w - qw.dequantize().to(w.device)
            u, v = lorc_factors(error, self.rank)
            ctx.qweights[name] = dataclasses.replace(qw, lorc_u=u.to(qw.codes.device), lorc_v=v.to(qw.codes.device))
            norm = float(w.pow(2).sum()) or 1.0
            stats = ctx.stats.setdefault(name, {})
            stats["lorc_rel_error_before"] = float(error.pow(2).sum()) / norm
            after = error - u.to(torch.float32).to(w.device) @ v.to(torch.float32).to(w.device)
            stats["lorc_rel_error_after"] = float(after.pow(2).sum()) / norm
