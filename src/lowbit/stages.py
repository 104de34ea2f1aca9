"""The stages of one block, as the runner (``lowbit.pipeline``) calls them in order:

    transform  -> equivalent rewrites of the float block (smoothing, shifting) by transform steps
    observe    -> one float pass: static activation and KV ranges, and the float outputs the
                  measure stage compares with (only when something needs them)
    quantize   -> the quantizer steps fill ``ctx.qweights``
    reconstruct -> reconstruct steps (AdaRound, SignRound) refine ``ctx.qweights`` against the
                  float block's outputs (``ctx.teacher``: the observe stage's reference, not a
                  second float pass), or, for a step with ``float_path`` (``teacher="model"``),
                  against the float model's outputs: the runner then carries the float model's
                  hidden states beside the quantized ones, and this block's float outputs on
                  them are computed first, on the untouched float block
    swap       -> each target becomes a QuantLinear
    measure    -> the quantized pass: each layer's output error and the block's outputs, which are
                  the next block's inputs; a data-free run measures the weights instead

Steps declare what they need (``Algorithm.needs``); a run whose steps need nothing and whose
scheme observes nothing (``needs_data``) makes no forward pass at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import dist
from lowbit.activations import ActivationStore
from lowbit.algorithms import Algorithm, BlockContext
from lowbit.algorithms.toolkit import FALLBACKS
from lowbit.errors import LowbitError
from lowbit.kvcache import KVQuantizer, kv_paused
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.observers import Observer
from lowbit.qweight import spec_observer
from lowbit.runreport import LayerReport
from lowbit.scheme import Recipe

# Layer errors are measured on at most this many calibration tokens: recomputing every layer's
# float output doubles the cost of the quantized pass, and a diagnostic needs no more
ERROR_TOKENS = 16384


def needs_data(recipe: Recipe, algorithms: list[Algorithm]) -> bool:
    """Whether the run needs calibration passes: a step needs the block's inputs, an activation
    spec is static (its range is observed) or counts outliers (LLM.int8's report), or the KV cache
    is static."""
    if any(a.needs for a in algorithms):
        return True
    specs = [recipe.scheme.input_activations, *(o.input_activations for o in recipe.scheme.overrides)]
    if any(s is not None and (not s.dynamic or s.outlier_threshold is not None) for s in specs):
        return True
    kv = recipe.scheme.kv_cache
    return kv is not None and not kv.dynamic


def block_targets(block: nn.Module, prefix: str, recipe: Recipe) -> tuple[dict[str, nn.Linear], dict[str, Any]]:
    """The linears of ``block`` the recipe quantizes (relative name -> module) and their specs."""
    targets, specs = {}, {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(module, nn.Linear) and recipe.scheme.is_target(full, module):
            w, a = recipe.scheme.specs_for(full, module)
            if w is not None or a is not None:
                targets[name], specs[name] = module, (w, a)
    return targets, specs


class BlockErrors(NamedTuple):
    """A block's relative output errors on the calibration set: ``block``, against the float
    block on the same (quantized-model) inputs, ``||out_q - out||^2 / ||out||^2``; ``model``,
    against the float model's own hidden states after this block (only in runs that carry the
    float model's path: a step with ``teacher: model``), which counts what the blocks before left
    too. None: not measured (a data-free run; no float path)."""

    block: float | None
    model: float | None


def quantize_block(
    ctx: BlockContext,
    algorithms: list[Algorithm],
    kvq: KVQuantizer | None,
    new_store: Callable[[], ActivationStore] | None,
    float_inputs: ActivationStore | None = None,
) -> tuple[list[LayerReport], BlockErrors, ActivationStore | None, ActivationStore | None]:
    """Quantize ``ctx.block`` in place. With calibration inputs (``new_store`` makes the stores
    that hold activations within the run's memory budget) returns the layer rows, the block's
    relative output errors (``BlockErrors``), its quantized outputs and, given the float model's
    inputs to this block (``float_inputs``, for steps with ``float_path``), the float block's
    outputs on them (the next block's float inputs); data-free, (rows, (None, None), None, None)."""
    transforms = [a for a in algorithms if a.kind == "transform"]
    reference: ActivationStore | None = None
    float_outputs: ActivationStore | None = None
    if float_inputs is not None and new_store is not None:
        with kv_paused(kvq):  # the untouched float block: the float model's path
            float_outputs = _collect(float_forward(ctx, float_inputs), new_store())
    if transforms:
        if new_store is not None:
            with kv_paused(kvq):
                # the untouched float block is the reference: some transforms are not exact
                # rewrites (AWQ's weight clipping), and the block error must count what they cost
                reference = _collect(ctx.forward_iter(), new_store())
        for algorithm in transforms:
            algorithm.apply(ctx)
    # observe: the float pass after the transforms sees the activations the quantized block will see
    observers = {n: spec_observer(a) for n, (_, a) in ctx.specs.items() if a is not None and not a.dynamic}
    if new_store is not None and (reference is None or observers or (kvq is not None and kvq.observing)):
        observed = _float_pass(ctx, observers, kvq, None if reference is not None else new_store())
        reference = observed if reference is None else reference
    for algorithm in algorithms:
        if algorithm.kind not in ("transform", "reconstruct"):
            algorithm.apply(ctx)
    reconstructs = [a for a in algorithms if a.kind == "reconstruct"]
    if reconstructs:
        _reconstruct(ctx, reconstructs, observers, kvq, reference, (float_inputs, float_outputs))
    if new_store is None:  # data-free: the weights' error, and no float copy is kept
        errors = {name: _weight_error(ctx, name) for name in ctx.targets}
        _swap_in_quant_linears(ctx, observers, keep_float=False)
        return [_row(ctx, name, errors[name]) for name in ctx.targets], BlockErrors(None, None), None, None
    float_weights = _swap_in_quant_linears(ctx, observers)
    assert reference is not None
    outputs = new_store()
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ctx.targets}
    hooks = {ctx.block.get_submodule(n): _error_hook(*float_weights[n], sums[n]) for n in ctx.targets}
    # [block error num, den, error against the float model's path num, den]
    totals = torch.zeros(4, dtype=torch.float64)
    path: Sequence[torch.Tensor | None] = float_outputs if float_outputs is not None else [None] * len(reference)
    for q, f, m in zip(ctx.forward_iter(hooks), reference, path, strict=True):
        totals[0] += _squared_sum(q - f).cpu()
        totals[1] += _squared_sum(f).cpu()
        if m is not None:
            totals[2] += _squared_sum(q - m).cpu()
            totals[3] += _squared_sum(m).cpu()
        outputs.append(q)
    for s in sums.values():
        dist.all_reduce_sum_(s)
    dist.all_reduce_sum_(totals)
    reference.close()
    rows = []
    for name in ctx.targets:
        e, r = sums[name].tolist()
        rows.append(_row(ctx, name, e / r if r > 0 else 0.0))
    num, den, model_num, model_den = totals.tolist()
    model_error = None if float_outputs is None else (model_num / model_den if model_den > 0 else 0.0)
    return rows, BlockErrors(num / den if den > 0 else 0.0, model_error), outputs, float_outputs


def float_forward(ctx: BlockContext, hidden: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``ctx.block``'s outputs on other hidden states (the float model's path), with the keyword
    arguments of ``ctx.inputs`` (the same calibration batches), one batch at a time."""
    kwargs = [k for _, k in ctx.inputs]
    if len(hidden) != len(kwargs):
        raise ValueError(f"{len(hidden)} batches of float-path hidden states but {len(kwargs)} calibration batches")
    ctx.passes += 1
    with torch.no_grad():
        for h, k in zip(hidden, kwargs, strict=True):
            out = ctx.block(h, **k)
            yield out[0] if isinstance(out, tuple) else out


def _reconstruct(
    ctx: BlockContext,
    steps: list[Algorithm],
    observers: dict[str, Observer],
    kvq: KVQuantizer | None,
    reference: ActivationStore | None,
    float_path: tuple[ActivationStore | None, ActivationStore | None] = (None, None),
) -> None:
    """Run the reconstruct steps with the reference outputs as ``ctx.teacher`` (for a step with
    ``float_path``: the float model's outputs at this block, its inputs as ``ctx.float_inputs``)
    and the observed static activation ranges; the KV quantizer is paused (the steps train
    without it)."""
    if reference is None:
        raise LowbitError(f"step(s) {', '.join(a.name for a in steps)} need calibration data")
    ctx.act_ranges = {name: observer.range() for name, observer in observers.items()}
    try:
        with kv_paused(kvq):
            for algorithm in steps:
                if algorithm.float_path():
                    if float_path[1] is None:
                        raise LowbitError(
                            f"{algorithm.name} reconstructs against the float model, but the run "
                            "carries no float path (call it through lowbit.pipeline.run)"
                        )
                    ctx.float_inputs, ctx.teacher = float_path
                else:
                    ctx.float_inputs, ctx.teacher = None, reference
                algorithm.apply(ctx)
    finally:
        ctx.teacher = None
        ctx.float_inputs = None


def _collect(outs: Iterator[torch.Tensor], store: ActivationStore) -> ActivationStore:
    for out in outs:
        store.append(out)
    return store


def _row(ctx: BlockContext, name: str, rel_error: float) -> LayerReport:
    module = ctx.block.get_submodule(name)
    assert isinstance(module, QuantLinear)
    wspec, aspec = ctx.specs[name]
    extra = dict(ctx.stats.get(name, {}))
    fallback = next((text for key, text in FALLBACKS.items() if extra.pop(key, 0.0)), None)
    outlier_dims = None
    if module.act is not None and aspec is not None and aspec.outlier_threshold is not None:
        extra.update(module.act.outlier_summary())  # counted on the quantized pass just run
        outlier_dims = module.act.outlier_positions(16)  # the 16 most frequent: the report stays small
    return LayerReport(
        name=f"{ctx.prefix}.{name}",
        weights=wspec.describe() if wspec else "float",
        activations=aspec.describe() if aspec else "float",
        rel_error=rel_error,
        bits_per_weight=module.qweight.bits_per_weight()
        if module.qweight is not None
        else module.bcq.bits_per_weight()
        if module.bcq is not None
        else module.weight.element_size() * 8.0,
        extra=extra,
        outlier_dims=outlier_dims,
        fallback=fallback,
        error_on="outputs" if ctx.inputs is not None and len(ctx.inputs) else "weights",
    )


def _weight_error(ctx: BlockContext, name: str) -> float:
    """``||W_q - W||^2 / ||W||^2`` of a target before it is swapped (the data-free run's error)."""
    qw = ctx.qweights.get(name)
    if qw is None:
        return 0.0
    w = ctx.targets[name].weight.detach().float()
    den = float(w.pow(2).sum(dtype=torch.float64))
    num = float((qw.dequantize().to(w.device) - w).pow_(2).sum(dtype=torch.float64))
    return num / den if den > 0 else 0.0


def _observe_input(observer: Observer) -> Callable[..., None]:
    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        observer.update(inp[0])

    return hook


def _float_pass(
    ctx: BlockContext, observers: dict[str, Observer], kvq: KVQuantizer | None, store: ActivationStore | None
) -> ActivationStore | None:
    """Run the float block: feed static activation and KV observers; its outputs (the reference)
    go to ``store`` when one is given."""
    hooks: dict[nn.Module, Callable[..., None]] = {ctx.targets[n]: _observe_input(o) for n, o in observers.items()}
    if kvq is not None:
        kvq.enabled = False  # the reference outputs are the float block's
    if store is not None:
        _collect(ctx.forward_iter(hooks), store)
    else:
        for _ in ctx.forward_iter(hooks):
            pass
    for observer in observers.values():
        observer.reduce()  # across data-parallel workers (a no-op in one process)
    if kvq is not None:
        if kvq.observing:
            kvq.reduce()  # across data-parallel workers (a no-op in one process)
            kvq.finish_calibration()
        kvq.enabled = True
    return store


def _swap_in_quant_linears(
    ctx: BlockContext, observers: dict[str, Observer], keep_float: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Replace each target by a QuantLinear; returns the float (weight, bias) each one replaced
    (a copy, for the measure stage; none without ``keep_float``)."""
    float_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, linear in ctx.targets.items():
        aspec = ctx.specs[name][1]
        act = ActQuantizer(aspec, ctx.act_clusters.get(name)) if aspec is not None else None
        if act is not None and name in observers:
            act.set_range(*observers[name].range())
        if keep_float:
            float_weights[name] = (linear.weight.detach().clone(), linear.bias)
        ctx.block.set_submodule(name, QuantLinear.from_linear(linear, ctx.qweights.get(name), act))
    return float_weights


def _error_hook(w: torch.Tensor, b: torch.Tensor | None, sums: torch.Tensor) -> Callable[..., None]:
    """Accumulate ``||y_q - y||^2`` and ``||y||^2`` with ``y = F.linear(x, w, b)`` on the layer's
    input, over the first ``ERROR_TOKENS`` tokens (whole batches) the layer sees."""
    seen = [0]

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if seen[0] >= ERROR_TOKENS:
            return
        seen[0] += inp[0].numel() // inp[0].shape[-1]
        ref = F.linear(inp[0], w, b)
        sums.add_(torch.stack([_squared_sum(out - ref), _squared_sum(ref)]).cpu())

    return hook


def _squared_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum(x ** 2)`` accumulated in float64 (the squares in ``x``'s dtype: a diagnostic needs no
    more, and a float64 copy of every activation cost a sixth of a GPTQ run)."""
    return (x * x).sum(dtype=torch.float64)
