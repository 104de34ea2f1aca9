"""RTN: round each weight to the nearest grid point, with ranges from the spec's observer."""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.errors import LowbitError
from lowbit.qweight import quantize_weight


@register("rtn", kind="quantizer")
@dataclass
class RTN(Algorithm):
    needs = frozenset()  # the weights alone: a recipe of RTN and dynamic activations runs no forward pass
    data_parallel = True

    def apply(self, ctx: BlockContext) -> None:
        for name, linear in ctx.targets.items():
            wspec = ctx.specs[name][0]
            if wspec is None:
                continue
            try:
                ctx.qweights[name] = quantize_weight(linear.weight, wspec)
            except LowbitError as e:
                raise LowbitError(f"{ctx.prefix}.{name}: {e}") from None
