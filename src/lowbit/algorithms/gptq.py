"""GPTQ and OWQ as recipe steps: Hessians from the block's calibration inputs, then ``lowbit.gptq``.

Sub-layers are handled in the architecture's order (q/k/v, o, gate/up, down). With
``true_sequential`` each group's Hessian is collected with the groups before it already
quantized, so every sub-layer is calibrated on the outputs it will really receive; otherwise
all Hessians come from one float pass. Linears that read the same input share one Hessian and
are solved as one stacked matrix (rows are independent given H, so this is exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import input_groups
from lowbit.errors import LowbitError
from lowbit.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from lowbit.qweight import QuantizedWeight, quantize_weight
from lowbit.scheme import QuantSpec


@contextlib.contextmanager
def _float_weights_restored(linears: list[nn.Linear]) -> Iterator[None]:
    """The algorithm may swap dequantized weights in; the pipeline still needs the float ones after."""
    saved = [lin.weight.data for lin in linears]
    try:
        yield
    finally:
        for lin, w in zip(linears, saved, strict=True):
            lin.weight.data = w


@register("gptq", kind="quantizer")
@dataclass
class GPTQ(Algorithm):
    """GPTQ: ``block_size`` lazy-batch width, ``damp`` fraction of mean diag(H), ``act_order``
    (columns by descending diag H), ``static_groups`` (group parameters fixed before reordering,
    no g_idx needed), ``true_sequential`` (each sub-layer sees the quantized ones before it)."""

    data_parallel = True  # Hessians are sums over the samples: all-reduced across workers

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    true_sequential: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.damp < 1e3:
            raise ValueError(f"damp must be a positive fraction of the mean Hessian diagonal, got {self.damp}")

    def apply(self, ctx: BlockContext) -> None:
        groups = input_groups(ctx)
        with _float_weights_restored([ctx.targets[n] for g in groups for n in g]):
            if self.true_sequential:
                for group in groups:
                    hessians = self._hessians(ctx, [group])
                    self._quantize_group(ctx, group, hessians[0])
            else:
                hessians = self._hessians(ctx, groups)
                for group, h in zip(groups, hessians, strict=True):
                    self._quantize_group(ctx, group, h)

    def _hessians(self, ctx: BlockContext, groups: list[list[str]]) -> list[torch.Tensor]:
        """One Hessian per group, from the input of its first member."""
        accs = [HessianAccumulator(ctx.targets[g[0]].in_features) for g in groups]
        ctx.feed_inputs({ctx.targets[g[0]]: acc.add for g, acc in zip(groups, accs, strict=True)})
        for acc in accs:
            acc.reduce()  # sums over data-parallel workers (a no-op in one process)
        return [acc.hessian() for acc in accs]

    def _keep_columns(self, w: torch.Tensor, h: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
        return None

    def _quantize_group(self, ctx: BlockContext, group: list[str], h: torch.Tensor) -> None:
        if not bool((h.diagonal() > 0).any()):
            # no input reached these layers (an unused expert, or only zeros): GPTQ has nothing to
            # minimise, every rounding is as good as another, so round to nearest and say so
            self._round_to_nearest(ctx, group)
            return
        # stack members with the same weight spec; a per-tensor range must stay per layer
        batches: list[tuple[QuantSpec, list[str]]] = []
        for name in group:
            spec = ctx.specs[name][0]
            assert spec is not None
            for other, names in batches:
                if other == spec and spec.granularity != "tensor":
                    names.append(name)
                    break
            else:
                batches.append((spec, [name]))
        for spec, names in batches:
            linears = [ctx.targets[n] for n in names]
            w = torch.cat([lin.weight.detach().float() for lin in linears], 0)
            try:
                keep = self._keep_columns(w, h, spec)
                result = gptq_quantize(
                    w,
                    h,
                    spec,
                    block_size=self.block_size,
                    damp=self.damp,
                    act_order=self.act_order,
                    static_groups=self.static_groups,
                    keep=keep,
                )
            except LowbitError as e:
                raise LowbitError(f"{ctx.prefix}.{names[0]}: {e}") from None
            self._store(ctx, names, linears, result)

    def _round_to_nearest(self, ctx: BlockContext, group: list[str]) -> None:
        for name in group:
            spec = ctx.specs[name][0]
            assert spec is not None
            ctx.qweights[name] = quantize_weight(ctx.targets[name].weight.detach().float(), spec)
            ctx.stats.setdefault(name, {})["fallback_rtn_zero_hessian"] = 1.0

    def _store(self, ctx: BlockContext, names: list[str], linears: list[nn.Linear], result: GPTQResult) -> None:
        qw, start = result.weight, 0
        for name, lin in zip(names, linears, strict=True):
            rows = slice(start, start + lin.out_features)
            start += lin.out_features
            part = QuantizedWeight(  # own copies: layers must not share storage (safetensors refuses it)
                codes=qw.codes[rows].clone(),
                scale=(qw.scale[rows] if qw.scale.shape[0] > 1 else qw.scale).clone(),
                zero_point=(qw.zero_point[rows] if qw.zero_point.shape[0] > 1 else qw.zero_point).clone(),
                g_idx=qw.g_idx.clone(),
                spec=qw.spec,
                outlier_idx=None if qw.outlier_idx is None else qw.outlier_idx.clone(),
                outlier_weight=None if qw.outlier_weight is None else qw.outlier_weight[rows].clone(),
            )
            ctx.qweights[name] = part
            stats = ctx.stats.setdefault(name, {})  # a transform before may have reported too
            stats["gptq_loss"] = float(result.loss[rows].sum())
            stats["damp"] = result.damp
            stats["seconds"] = result.seconds * lin.out_features / qw.codes.shape[0]
            if part.n_outlier_columns:
                stats["float_columns"] = float(part.n_outlier_columns)
            # later sub-layers are calibrated on the outputs of the quantized ones
            lin.weight.data = part.dequantize().to(lin.weight.dtype)


@register("owq", kind="quantizer")
@dataclass
class OWQ(GPTQ):
    """OWQ: per layer, the ``columns`` input columns with the largest sensitivity
    ``H_jj · ||W_j - RTN(W)_j||²`` stay in float16 and GPTQ quantizes the rest. Without
    ``columns``, as many as ``extra_bits`` bits per weight pay for (16 bits per kept weight
    plus a 16-bit index per column)."""

    columns: int | None = None
    extra_bits: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.columns is not None and self.columns < 0:
            raise ValueError(f"columns must be >= 0, got {self.columns}")
        if self.extra_bits < 0:
            raise ValueError(f"extra_bits must be >= 0, got {self.extra_bits}")

    def _keep_columns(self, w: torch.Tensor, h: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
        out, inp = w.shape
        budget = int(self.extra_bits * out * inp // (16 * out + 16))
        k = min(self.columns if self.columns is not None else budget, inp - 1)
        if k <= 0:
            return None
        rtn_error = (w - quantize_weight(w, spec).dequantize()).pow(2).sum(0)
        sensitivity = h.diagonal() * rtn_error
        return torch.sort(torch.topk(sensitivity, k).indices).values
