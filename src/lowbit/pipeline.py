"""The layer-by-layer runner.

1. Run the model on the calibration batches with the decoder blocks bypassed and keep the first
   block's hidden states and the keyword arguments the model passes each block.
2. For each block: apply the recipe's transforms (equivalent rewrites of the float block);
   run it in float over its inputs, observing static activation / KV ranges and keeping the
   float outputs; apply the quantizer; swap the targeted linears for QuantLinear; run the
   quantized block over the same inputs, measuring each layer's output error, and pass its
   outputs on as the next block's inputs.

Working memory is one block plus its calibration activations; errors are seen where they
accumulate because every block is calibrated on the outputs of the quantized blocks before it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import defaults
from lowbit.algorithms import Algorithm, BlockContext, build_algorithm
from lowbit.algorithms.gptq import FALLBACKS
from lowbit.archs import Arch, decoder_blocks, get_arch
from lowbit.errors import LowbitError
from lowbit.hooks import StopForward, replaced_forwards
from lowbit.kvcache import KVQuantizer, attach_kv_quantizers, kv_paused
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.observers import Observer
from lowbit.qweight import spec_observer
from lowbit.scheme import Recipe


@dataclass
class LayerReport:
    name: str
    weights: str
    activations: str
    rel_error: float  # ||y_q - y||^2 / ||y||^2 of the layer's output on (up to ERROR_TOKENS) calibration inputs
    bits_per_weight: float
    extra: dict[str, float] = field(default_factory=dict)
    # LLM.int8(): input dimensions kept in float on the calibration inputs, most frequent first (at most 16)
    outlier_dims: list[int] | None = None
    fallback: str | None = None  # the quantizer fell back to another, e.g. "rtn (Hessian is all zero: ...)"


@dataclass
class RunReport:
    recipe: Recipe
    layers: list[LayerReport]
    block_errors: list[float]
    seconds: float
    n_samples: int
    seq_len: int
    warnings: list[str] = field(default_factory=list)  # what the user should know, e.g. layers that fell back

    def worst_layers(self, n: int) -> list[LayerReport]:
        """The ``n`` layers with the largest relative output error."""
        return sorted(self.layers, key=lambda r: r.rel_error, reverse=True)[:n]

    def to_dict(self) -> dict[str, Any]:
        from lowbit.scheme import to_dict

        return {
            "recipe": to_dict(self.recipe),
            "layers": [vars(layer) for layer in self.layers],
            "block_errors": self.block_errors,
            "seconds": self.seconds,
            "calibration": {"samples": self.n_samples, "seq_len": self.seq_len},
            "warnings": self.warnings,
        }


@torch.no_grad()
def capture_calibration_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Hidden states entering the first block (per batch) and the keyword arguments every block
    receives (per block, per batch).

    Blocks of one model may receive different keyword arguments (Gemma 2/3, Qwen2 with sliding
    layers: a sliding-window or a full causal mask, local or global rotary embeddings), so each
    block's are recorded. Every block is bypassed while recording (it returns its input), so no
    block computes anything; the pass stops at the last block.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]

    def bypass(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kw: Any) -> Any:
            rest = dict(kw)
            h = args[0] if args else rest.pop("hidden_states")
            kwargs[i].append(rest)
            if i == 0:
                hidden.append(h.detach())
            if i == len(blocks) - 1:
                raise StopForward
            return h

        return forward

    with replaced_forwards(blocks, bypass):
        for batch in calib.split(batch_size):
            with contextlib.suppress(StopForward):
                model(input_ids=batch, use_cache=False)
    return hidden, kwargs


def _targets(block: nn.Module, prefix: str, recipe: Recipe) -> tuple[dict[str, nn.Linear], dict[str, Any]]:
    targets, specs = {}, {}
    for name, module in block.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(module, nn.Linear) and recipe.scheme.is_target(full, module):
            w, a = recipe.scheme.specs_for(full, module)
            if w is not None or a is not None:
                targets[name], specs[name] = module, (w, a)
    return targets, specs


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor,
    batch_size: int = defaults.BATCH_SIZE,
    progress: bool = True,
) -> RunReport:
    """Quantize ``model`` in place with ``recipe`` on calibration token ids ``calib`` (n, T)."""
    start = time.perf_counter()
    algorithms: list[Algorithm] = [build_algorithm(s.name, s.params) for s in recipe.steps]
    has_quantizer = any(a.kind == "quantizer" for a in algorithms)
    if recipe.scheme.weights is not None and not has_quantizer:
        raise LowbitError(f"recipe {recipe.name!r} quantizes weights but has no quantizer step (e.g. rtn)")
    arch = get_arch(model)
    blocks = decoder_blocks(model, arch)
    model.eval()
    for algorithm in algorithms:
        algorithm.prepare(model, recipe, calib, batch_size)
    kv_quants = []
    if recipe.scheme.kv_cache is not None:
        attns = [b.get_submodule(arch.attention) for b in blocks]
        kv_quants = attach_kv_quantizers(model, attns, recipe.scheme.kv_cache)

    hidden, block_kwargs = capture_calibration_inputs(model, blocks, calib, batch_size)
    layers: list[LayerReport] = []
    block_errors: list[float] = []
    # the bar keeps its count, rate and time left readable; the last block's numbers go to a
    # status line below it (every layer's: --layers, or the run report)
    bar = tqdm(total=len(blocks), desc=f"quantize {recipe.name}", unit="block", disable=not progress)
    status = tqdm(total=0, bar_format="  {desc}", position=1, leave=False, disable=not progress)
    try:
        for i in range(len(blocks)):
            inputs = list(zip(hidden, block_kwargs[i], strict=True))
            hidden, err = _quantize_block(
                blocks[i], i, f"{arch.blocks}.{i}", arch, recipe, inputs, algorithms, kv_quants, layers
            )
            block_errors.append(err)
            block_layers = [r for r in layers if r.name.startswith(f"{arch.blocks}.{i}.")]
            status.set_description_str(f"block {i}: " + _status(err, block_layers))
            bar.update(1)
    finally:
        status.close()
        bar.close()
    warnings = [f"{r.name}: fallback: {r.fallback}" for r in layers if r.fallback]
    seconds = time.perf_counter() - start
    return RunReport(recipe, layers, block_errors, seconds, calib.shape[0], calib.shape[1], warnings)


def _status(block_err: float, layers: list[LayerReport]) -> str:
    """The status line under the bar: the block's error, its worst layer, and what the algorithm
    reported (GPTQ's loss summed over the block, the largest damping used, the solve time)."""
    parts = [f"error {block_err:.2e}"]
    if layers:
        worst = max(layers, key=lambda r: r.rel_error)
        parts.append(f"worst {worst.name.rsplit('.', 1)[-1]} {worst.rel_error:.1e}")
    losses = [r.extra["gptq_loss"] for r in layers if "gptq_loss" in r.extra]
    if losses:
        parts.append(f"GPTQ loss {sum(losses):.3g}")
        parts.append(f"damp {max(r.extra['damp'] for r in layers if 'damp' in r.extra):g}")
        parts.append(f"solve {sum(r.extra.get('seconds', 0.0) for r in layers):.1f} s")
    return ", ".join(parts)


def _observe_input(observer: Observer) -> Callable[..., None]:
    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        observer.update(inp[0])

    return hook


def _quantize_block(
    block: nn.Module,
    index: int,
    prefix: str,
    arch: Arch,
    recipe: Recipe,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    algorithms: list[Algorithm],
    kv_quants: list[KVQuantizer],
    layers: list[LayerReport],
) -> tuple[list[torch.Tensor], float]:
    """Quantize one block in place; returns its quantized outputs and its relative output error."""
    targets, specs = _targets(block, prefix, recipe)
    ctx = BlockContext(block, index, prefix, arch, recipe.scheme, inputs, targets, specs)
    kvq = kv_quants[index] if kv_quants else None
    transforms = [a for a in algorithms if a.kind == "transform"]
    reference = None
    if transforms:
        with kv_paused(kvq):
            # the untouched float block is the reference: some transforms are not exact
            # rewrites (AWQ's weight clipping), and the block error must count what they cost
            reference = ctx.forward()
            for algorithm in transforms:
                algorithm.apply(ctx)
    # the float pass after the transforms observes the activations the quantized block will see
    observers = {n: spec_observer(a) for n, (_, a) in specs.items() if a is not None and not a.dynamic}
    if reference is None or observers or (kvq is not None and kvq.observing):
        observed = _float_pass(ctx, observers, kvq)
        reference = observed if reference is None else reference
    float_out: list[torch.Tensor] = reference
    for algorithm in algorithms:
        if algorithm.kind != "transform":
            algorithm.apply(ctx)
    float_weights = _swap_in_quant_linears(ctx, observers)
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in targets}
    hooks = {block.get_submodule(n): _error_hook(*float_weights[n], sums[n]) for n in targets}
    quant_out = ctx.forward(hooks)
    for name in targets:
        module = block.get_submodule(name)
        assert isinstance(module, QuantLinear)
        wspec, aspec = specs[name]
        e, r = sums[name].tolist()
        extra = dict(ctx.stats.get(name, {}))
        fallback = next((text for key, text in FALLBACKS.items() if extra.pop(key, 0.0)), None)
        outlier_dims = None
        if module.act is not None and aspec is not None and aspec.outlier_threshold is not None:
            extra.update(module.act.outlier_summary())  # counted on the quantized pass just run
            outlier_dims = module.act.outlier_positions(16)  # the 16 most frequent: the report stays small
        layers.append(
            LayerReport(
                name=f"{prefix}.{name}",
                weights=wspec.describe() if wspec else "float",
                activations=aspec.describe() if aspec else "float",
                rel_error=e / r if r > 0 else 0.0,
                bits_per_weight=module.qweight.bits_per_weight()
                if module.qweight is not None
                else module.weight.element_size() * 8.0,
                extra=extra,
                outlier_dims=outlier_dims,
                fallback=fallback,
            )
        )
    num = sum(float((q - f).double().pow(2).sum()) for q, f in zip(quant_out, float_out, strict=True))
    den = sum(float(f.double().pow(2).sum()) for f in float_out)
    return quant_out, num / den if den > 0 else 0.0


def _float_pass(ctx: BlockContext, observers: dict[str, Observer], kvq: KVQuantizer | None) -> list[torch.Tensor]:
    """Run the float block: feed static activation and KV observers; the outputs are the reference."""
    hooks: dict[nn.Module, Callable[..., None]] = {ctx.targets[n]: _observe_input(o) for n, o in observers.items()}
    if kvq is not None:
        kvq.enabled = False  # the reference outputs are the float block's
    out = ctx.forward(hooks)
    if kvq is not None:
        if kvq.observing:
            kvq.finish_calibration()
        kvq.enabled = True
    return out


def _swap_in_quant_linears(
    ctx: BlockContext, observers: dict[str, Observer]
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Replace each target by a QuantLinear; returns the float (weight, bias) each one replaced."""
    float_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, linear in ctx.targets.items():
        aspec = ctx.specs[name][1]
        act = ActQuantizer(aspec) if aspec is not None else None
        if act is not None and name in observers:
            act.set_range(*observers[name].range())
        float_weights[name] = (linear.weight.detach().clone(), linear.bias)
        ctx.block.set_submodule(name, QuantLinear.from_linear(linear, ctx.qweights.get(name), act))
    return float_weights


# Layer errors are measured on at most this many calibration tokens: recomputing every layer's
# float output doubles the cost of the quantized pass, and a diagnostic needs no more
ERROR_TOKENS = 16384


def _error_hook(w: torch.Tensor, b: torch.Tensor | None, sums: torch.Tensor) -> Callable[..., None]:
    """Accumulate ``||y_q - y||^2`` and ``||y||^2`` with ``y = F.linear(x, w, b)`` on the layer's
    input, over the first ``ERROR_TOKENS`` tokens (whole batches) the layer sees."""
    seen = [0]

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if seen[0] >= ERROR_TOKENS:
            return
        seen[0] += inp[0].numel() // inp[0].shape[-1]
        ref = F.linear(inp[0], w, b)
        sums.add_(torch.stack([(out - ref).double().pow(2).sum(), ref.double().pow(2).sum()]))

    return hook
