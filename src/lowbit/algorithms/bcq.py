"""BCQ (LUT-GEMM, Park et al. 2022) as recipe steps: binary-coding quantization of each target.

``bcq`` fits every weight-quantized target on its own (data-free, as the paper: the weights'
squared error); ``bcq_aware`` weights each input column's error by the layer's input second
moment ``diag(H) = sum_t x_t^2`` over the calibration tokens (our activation-aware variant, the
objective GPTQ minimises restricted to its diagonal, so the two can be compared). The scheme's
weight spec gives the bits (``uint3`` -> 3 binary planes) and the group; the result is a
:class:`~lowbit.bcq.BCQWeight`, not a grid of scale and zero point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit import dist
from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import input_groups
from lowbit.bcq import INITS, bcq_group_size, bcq_weight, check_bits, check_group, fit_bcq
from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec


def _bits(spec: QuantSpec) -> int:
    if spec.fmt.is_float:
        raise LowbitError(f"BCQ needs an integer weight format for its bit count (e.g. uint3), got {spec.format}")
    check_bits(spec.fmt.bits)
    return spec.fmt.bits


@register("bcq", kind="quantizer")
@dataclass
class BCQ(Algorithm):
    """A start (``init``) then ``rounds`` of alternating least squares (alphas and offset, then codes)."""

    needs = frozenset()  # the weights alone
    data_parallel = True

    rounds: int = 10  # our choice: most of the gain is made by then (the paper fixes no number)
    # the start: "greedy" is the paper's; "best" (default) takes per row and group the better of
    # the greedy start and the MSE-clipped uniform grid: on the demo model the greedy start ends
    # above RTN's error at 3 bits (greedy 0.034 vs RTN 0.031 relative error, gate_proj of block 1)
    # and the uniform start above the greedy one at 2 bits
    init: str = "best"

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")

    def apply(self, ctx: BlockContext) -> None:
        weights = self._column_weights(ctx)
        for name, linear in ctx.targets.items():
            spec = ctx.specs[name][0]
            if spec is None:
                continue
            try:
                w = linear.weight.detach().float()
                bits, group = _bits(spec), bcq_group_size(spec, w.shape[1])
                check_group(w.shape[1], group)
                fit = fit_bcq(w, bits, group, self.rounds, col_weight=weights.get(name), init=self.init)
                qw = bcq_weight(fit, w, spec, group)
            except LowbitError as e:
                raise LowbitError(f"{ctx.prefix}.{name}: {e}") from None
            ctx.qweights[name] = qw
            stats = ctx.stats.setdefault(name, {})
            stats["bcq_error_start"] = fit.errors[0]
            stats["bcq_error"] = fit.errors[-1]

    def _column_weights(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        return {}


@register("bcq_aware", kind="quantizer")
@dataclass
class BCQAware(BCQ):
    """``bcq`` with each input column's error weighted by ``diag(H)`` of the layer's inputs
    (one float pass over the block: every layer sees the float block's inputs)."""

    needs = frozenset({"inputs"})

    def _column_weights(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        groups = input_groups(ctx)
        sums: dict[str, torch.Tensor] = {}

        def consumer(key: str) -> Callable[[torch.Tensor], None]:
            def add(x: torch.Tensor) -> None:
                sq = x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()
                sums[key] = sq if key not in sums else sums[key] + sq

            return add

        ctx.feed_inputs({ctx.targets[g[0]]: consumer(g[0]) for g in groups})
        out: dict[str, torch.Tensor] = {}
        for group in groups:
            h = sums.get(group[0])
            if h is None:
                continue
            h = dist.all_reduce_sum_(h)  # over data-parallel workers (a no-op in one process)
            if not bool((h > 0).any()):
                continue  # no input reached the layer: plain BCQ
            for name in group:
                out[name] = h.float()
        return out
