"""Olive (Guo et al., ISCA 2023): outlier-victim pair quantization of weights and activations.

The numbers are ``lowbit.olive``'s; a scheme asks for them with ``encoding: olive`` on an int4 or
int8 spec (weights per tensor, as the paper, or per channel; activations dynamic per tensor). This
step quantizes the weights (``quantize_weight`` encodes olive specs: MSE-chosen scale, pair codes)
and reports, per layer, how often pairs held an outlier and how many victims lost a non-zero value,
for the weights and for the activations the layer saw on the calibration inputs (the float block's
inputs, with the previous blocks quantized, each batch with its own dynamic scale as at run time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit import dist
from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.errors import LowbitError
from lowbit.olive import olive_dynamic_scale, olive_encode, olive_grid, pair_stats
from lowbit.qweight import quantize_weight


@register("olive", kind="quantizer")
@dataclass
class Olive(Algorithm):
    data_parallel = True  # weights need no data; the activation counts are sums
    # needs the inputs (the default) only to count the activations' outlier pairs

    def apply(self, ctx: BlockContext) -> None:
        counters: dict[torch.nn.Module, Callable[[torch.Tensor], None]] = {}
        sums: dict[str, torch.Tensor] = {}
        for name, linear in ctx.targets.items():
            wspec, aspec = ctx.specs[name]
            if (wspec is None or wspec.encoding != "olive") and (aspec is None or aspec.encoding != "olive"):
                raise LowbitError(
                    f"{ctx.prefix}.{name}: the olive step needs specs with encoding 'olive' (presets w4a4-olive, "
                    "w8a8-olive); use rtn for plain integer grids"
                )
            stats = ctx.stats.setdefault(name, {})
            if wspec is not None:
                try:
                    qw = quantize_weight(linear.weight, wspec)
                except LowbitError as e:
                    raise LowbitError(f"{ctx.prefix}.{name}: {e}") from None
                ctx.qweights[name] = qw
                if wspec.encoding == "olive":
                    y = linear.weight.detach().float() / qw.scale.to(linear.weight.device)
                    pairs, hit, lost = pair_stats(y, qw.codes.to(y.device), olive_grid(wspec.bits))
                    stats["w_outlier_pairs"] = hit / max(pairs, 1)
                    stats["w_victims_zeroed"] = float(lost)
            if aspec is not None and aspec.encoding == "olive" and ctx.inputs:
                sums[name] = torch.zeros(3, dtype=torch.float64)
                counters[linear] = _counter(sums[name], aspec.bits)
        if counters:
            ctx.feed_inputs(counters)
        for name, total in sums.items():
            dist.all_reduce_sum_(total)  # over data-parallel workers (a no-op in one process)
            pairs, hit, lost = total.tolist()
            ctx.stats[name]["a_outlier_pairs"] = hit / max(pairs, 1.0)
            ctx.stats[name]["a_victims_zeroed"] = lost


def _counter(total: torch.Tensor, bits: int) -> Callable[[torch.Tensor], None]:
    """Add an activation's (pairs, outlier pairs, victims zeroed), as the dynamic quantizer encodes
    it, to ``total`` (3,) float64."""
    grid = olive_grid(bits)

    def count(x: torch.Tensor) -> None:
        xf = x.detach().float()
        y = xf / olive_dynamic_scale(xf, grid)
        total.add_(torch.tensor(pair_stats(y, olive_encode(y, grid), grid), dtype=torch.float64))

    return count
