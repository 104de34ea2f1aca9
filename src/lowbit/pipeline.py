"""The block runner: a model quantized one decoder block at a time.

    source  (``lowbit.source``: the model's blocks, loaded when processed and released after)
      -> capture   what enters the first block (only when the run needs calibration data)
      -> for each block, the stages of ``lowbit.stages``:
           gather (the previous block's quantized outputs, in memory up to ``max_memory`` and on
           disk past it) -> transform -> observe -> quantize -> swap -> measure -> emit
      -> sink  (``lowbit.sink``: each finished block written as it is produced; a run resumes
           from the last finished block)

Errors are seen where they accumulate: every block is calibrated on the outputs of the quantized
blocks before it. A step that searches on the model's output (SmoothQuant+) runs its candidates
in place before the first block and the float weights are restored after each one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import defaults, dist
from lowbit.activations import ActivationStore, BlockInputs, Spill, capture_calibration_inputs, kwargs_to
from lowbit.algorithms import Algorithm, BlockContext, build_algorithm
from lowbit.archs import decoder_blocks, get_arch
from lowbit.errors import LowbitError
from lowbit.kvcache import KVQuantizer, attach_kv_quantizers, kv_paused
from lowbit.modules import QuantLinear
from lowbit.runreport import LayerReport, RunReport
from lowbit.source import InMemorySource
from lowbit.stages import ERROR_TOKENS, BlockErrors, block_targets, needs_data, quantize_block

__all__ = [
    "ERROR_TOKENS",
    "LayerReport",
    "RunOptions",
    "RunReport",
    "capture_calibration_inputs",
    "model_search",
    "quantize_model",
    "run",
]

_targets = block_targets  # the name earlier code used


class Source(Protocol):
    model: nn.Module
    in_memory: bool

    def load(self, prefix: str) -> None: ...
    def load_outer(self) -> None: ...
    def release(self, prefix: str) -> None: ...
    def float_state(self, prefix: str) -> dict[str, torch.Tensor]: ...


class Sink(Protocol):
    def finished(self) -> list[int]: ...
    def write_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        layers: dict[str, Any],
        state: dict[str, Any],
        *,
        kv_cache: dict[str, Any] | None = None,
    ) -> None: ...
    def save_boundary(self, index: int, hidden: list[torch.Tensor]) -> None: ...
    def load_boundary(self) -> tuple[int, list[torch.Tensor]] | None: ...
    def block_state(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass
class RunOptions:
    batch_size: int = defaults.BATCH_SIZE
    progress: bool = True
    max_memory: int | None = None  # bytes of calibration activations kept in memory (None: no limit)
    device: str = "cpu"  # where each block and its activations are processed: cpu, cuda, cuda:N or auto
    spill_dir: str | Path | None = None  # where activations past max_memory go (default: the temp dir)
    # run the calibration passes and measure output errors even when the recipe needs no data
    # (a data-free recipe otherwise makes no forward pass and reports weight errors)
    measure: bool = False


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; a CUDA device that is
    not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LowbitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device {name!r} asked for, but this torch sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise LowbitError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


def quantize_model(
    model: nn.Module,
    recipe: Any,
    calib: torch.Tensor,
    batch_size: int = defaults.BATCH_SIZE,
    progress: bool = True,
    *,
    max_memory: int | None = None,
    device: str = "cpu",
    spill_dir: str | Path | None = None,
    measure: bool = False,
) -> RunReport:
    """Quantize an already-loaded ``model`` in place with ``recipe`` on calibration token ids
    ``calib`` (n, T). See ``RunOptions`` for the keyword options."""
    options = RunOptions(batch_size, progress, max_memory, device, spill_dir, measure)
    return run(InMemorySource(model), recipe, calib, options)


def run(source: Source, recipe: Any, calib: torch.Tensor, options: RunOptions, sink: Sink | None = None) -> RunReport:
    """Quantize the model of ``source`` block by block; with a ``sink`` each block is written as
    it is finished, and blocks the sink already holds (a resumed run) are skipped."""
    start = time.perf_counter()
    algorithms: list[Algorithm] = [build_algorithm(s.name, s.params) for s in recipe.steps]
    if recipe.scheme.weights is not None and not any(a.kind == "quantizer" for a in algorithms):
        raise LowbitError(f"recipe {recipe.name!r} quantizes weights but has no quantizer step (e.g. rtn)")
    if dist.world() > 1:
        serial = sorted({a.name for a in algorithms if not a.splits_exactly()})
        if serial:
            raise LowbitError(
                f"step(s) {', '.join(serial)} search or train on their own calibration samples and would decide "
                f"differently on each of the {dist.world()} workers; run them with one worker (drop --workers)"
            )
    device = resolve_device(options.device)
    model = source.model
    model.eval()
    for algorithm in algorithms:
        model_search(source, algorithm, recipe, calib, options)
    arch = get_arch(model)
    blocks = decoder_blocks(model, arch)
    kv_quants: list[KVQuantizer] = []
    if recipe.scheme.kv_cache is not None:
        kv_quants = attach_kv_quantizers(
            model, [b.get_submodule(arch.attention) for b in blocks], recipe.scheme.kv_cache
        )
    data = options.measure or needs_data(recipe, algorithms)
    spill = Spill(options.max_memory, options.spill_dir)
    layers: list[LayerReport] = []
    block_errors: list[float] = []
    model_errors: list[float] = []  # against the float model's path, in runs that carry it
    passes = 0
    first = 0
    if sink is not None and sink.finished():
        first, layers, block_errors, model_errors = _resumed(sink)
    # the bar keeps its count, rate and time left readable; the last block's numbers go to a
    # status line below it (every layer's: --layers, or the run report)
    bar = tqdm(
        total=len(blocks), initial=first, desc=f"quantize {recipe.name}", unit="block", disable=not options.progress
    )
    status = tqdm(total=0, bar_format="  {desc}", position=1, leave=False, disable=not options.progress)
    hidden: ActivationStore | None = None
    float_hidden: ActivationStore | None = None  # the float model's path, for steps with float_path
    try:
        block_kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]
        if data:
            source.load_outer()
            captured, block_kwargs = capture_calibration_inputs(model, blocks, calib, options.batch_size)
            if any(a.float_path() for a in algorithms):
                float_hidden = ActivationStore.of(captured, spill, device)
                if first:  # a resumed run: the float model's hidden states after the finished blocks
                    float_hidden = _float_path_to(
                        first, source, blocks, arch.blocks, block_kwargs, float_hidden, kv_quants, device
                    )
            if first:
                captured = _boundary(sink, first)
            hidden = ActivationStore.of(captured, spill, device)
            del captured
        for i in range(first, len(blocks)):
            prefix = f"{arch.blocks}.{i}"
            source.load(prefix)
            block = blocks[i].to(device)
            targets, specs = block_targets(block, prefix, recipe)
            inputs = BlockInputs([], [])
            if hidden is not None:
                inputs = BlockInputs(hidden, [kwargs_to(k, device) for k in block_kwargs[i]])
            ctx = BlockContext(block, i, prefix, arch, recipe.scheme, inputs, targets, specs)
            ctx.progress = options.progress
            kvq = kv_quants[i] if kv_quants else None
            new_store = (lambda: ActivationStore(spill, device)) if data else None
            rows, errors, outputs, float_outputs = quantize_block(ctx, algorithms, kvq, new_store, float_hidden)
            if float_hidden is not None:
                float_hidden.close()
                float_hidden = float_outputs
            passes += ctx.passes
            layers.extend(rows)
            if errors.block is not None:
                block_errors.append(errors.block)
            if errors.model is not None:
                model_errors.append(errors.model)
            block.to("cpu")
            _to_host(block)
            if hidden is not None:
                hidden.close()
                hidden = outputs
            if sink is not None:
                _emit(sink, block, prefix, i, rows, errors, hidden)
            if not source.in_memory:
                _unload(block)
                source.release(prefix)
                _give_back_memory()
            status.set_description_str(f"block {i}: " + _status(errors, rows))
            bar.update(1)
    finally:
        for store in (hidden, float_hidden):
            if store is not None:
                store.close()
        spill.close()
        status.close()
        bar.close()
    warnings = [f"{r.name}: fallback: {r.fallback}" for r in layers if r.fallback]
    return RunReport(
        recipe,
        layers,
        block_errors,
        time.perf_counter() - start,
        calib.shape[0],
        calib.shape[1],
        warnings,
        forward_passes=passes,
        spilled_bytes=spill.spilled,
        model_errors=model_errors,
    )


def _emit(
    sink: Sink,
    block: nn.Module,
    prefix: str,
    index: int,
    rows: list[LayerReport],
    errors: BlockErrors,
    outputs: ActivationStore | None,
) -> None:
    """Write a finished block, then the hidden states after it. The sink keeps, on resume, the
    blocks up to the last saved boundary: a block whose outputs were lost is done again."""
    from lowbit.checkpoint import block_tensors

    tensors, table, kv = block_tensors(block, prefix)
    state = {"layers": [dataclasses.asdict(r) for r in rows], "block_error": errors.block, "model_error": errors.model}
    sink.write_block(index, tensors, table, state, kv_cache=kv)
    if outputs is not None:  # the next block's inputs: what a resumed run starts from
        sink.save_boundary(index, outputs.on_host())


def _resumed(sink: Sink) -> tuple[int, list[LayerReport], list[float], list[float]]:
    finished = sorted(sink.finished())
    if finished != list(range(len(finished))):
        raise LowbitError(f"the partial run holds blocks {finished}, not a prefix 0..k; rerun without --resume")
    layers: list[LayerReport] = []
    errors: list[float] = []
    model_errors: list[float] = []
    for i in finished:
        state = sink.block_state(i)
        layers.extend(LayerReport.from_dict(r) for r in state["layers"])
        if state.get("block_error") is not None:
            errors.append(float(state["block_error"]))
        if state.get("model_error") is not None:
            model_errors.append(float(state["model_error"]))
    return len(finished), layers, errors, model_errors


def _float_path_to(
    first: int,
    source: Source,
    blocks: nn.ModuleList,
    prefix: str,
    block_kwargs: list[list[dict[str, Any]]],
    hidden: ActivationStore,
    kv_quants: list[KVQuantizer],
    device: torch.device,
) -> ActivationStore:
    """The float model's hidden states after blocks ``0..first-1`` (a resumed run skips them, but
    a step with ``float_path`` needs their float outputs): each float block run on ``hidden``."""
    for i in range(first):
        source.load(f"{prefix}.{i}")
        block = blocks[i].to(device)
        outputs = ActivationStore(hidden.spill, device)
        with torch.no_grad(), kv_paused(kv_quants[i] if kv_quants else None):
            for h, kwargs in zip(hidden, block_kwargs[i], strict=True):
                out = block(h, **kwargs_to(kwargs, device))
                outputs.append(out[0] if isinstance(out, tuple) else out)
        block.to("cpu")
        if not source.in_memory:
            source.release(f"{prefix}.{i}")
        hidden.close()
        hidden = outputs
    return hidden


def _boundary(sink: Sink | None, first: int) -> list[torch.Tensor]:
    saved = sink.load_boundary() if sink is not None else None
    if saved is None or saved[0] != first - 1:
        got = "none" if saved is None else f"the one after block {saved[0]}"
        raise LowbitError(
            f"the partial run finished blocks 0..{first - 1} but holds {got} of the activations after them; "
            "rerun without --resume"
        )
    return saved[1]


def _to_host(block: nn.Module) -> None:
    """Move the quantized layers' codes and scales to the CPU with the block: ``Module.to`` moves
    buffers only, and ``qweight`` / ``bcq`` are plain attributes (a run on a GPU left them there,
    about the model's quantized size, and writing a checkpoint compared them with CPU tensors)."""
    for module in block.modules():
        if isinstance(module, QuantLinear):
            if module.qweight is not None:
                module.qweight = module.qweight.to("cpu")
            if module.bcq is not None:
                module.bcq = module.bcq.to("cpu")


def _unload(block: nn.Module) -> None:
    """Give a written block's memory back: quantized layers become empty (meta) linears again."""
    for name, module in list(block.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            block.set_submodule(name, linear)


def _give_back_memory() -> None:
    """Return a released block's memory to the OS. glibc keeps freed heap memory for reuse, and
    blocks of many sizes fragment it: on a 34-block 26 GB llama the resident set grew by ~60 MB a
    block (peak 5.9 GB) without this, and stayed flat with it."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def _status(errors: BlockErrors, layers: list[LayerReport]) -> str:
    """The status line under the bar: the block's error (and against the float model, when the run
    carries its path), its worst layer, and what the algorithm reported (GPTQ's loss summed over
    the block, the largest damping used, the solve time)."""
    parts = [f"error {errors.block:.2e}" if errors.block is not None else "no calibration pass"]
    if errors.model is not None:
        parts.append(f"vs float model {errors.model:.2e}")
    if layers:
        worst = max(layers, key=lambda r: r.rel_error)
        parts.append(f"worst {worst.name.rsplit('.', 1)[-1]} {worst.rel_error:.1e}")
    losses = [r.extra["gptq_loss"] for r in layers if "gptq_loss" in r.extra]
    if losses:
        parts.append(f"GPTQ loss {sum(losses):.3g}")
        parts.append(f"damp {max(r.extra['damp'] for r in layers if 'damp' in r.extra):g}")
        parts.append(f"solve {sum(r.extra.get('seconds', 0.0) for r in layers):.1f} s")
    recon = [r.extra for r in layers if "recon_loss_start" in r.extra]
    if recon:  # learned rounding: the block's reconstruction loss before -> after (the same for every layer)
        parts.append(f"reconstruction {recon[0]['recon_loss_start']:.3g} -> {recon[0]['recon_loss_end']:.3g}")
    return ", ".join(parts)


@torch.no_grad()
def _log_probs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence of ``ids`` (n, T), the model's next-token log-probabilities (1, T, V)."""
    return [model(input_ids=seq, use_cache=False).logits.float().log_softmax(-1) for seq in ids.split(1)]


def _kl(reference: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Mean per-token ``KL(reference || got)``; non-finite results come back as inf."""
    total, tokens = 0.0, 0
    for ref, q in zip(reference, got, strict=True):
        total += float((ref.exp() * (ref - q)).double().sum())
        tokens += ref.shape[0] * ref.shape[1]
    kl = total / max(tokens, 1)
    return kl if math.isfinite(kl) else float("inf")


def model_search(
    source: Source | nn.Module,
    algorithm: Algorithm,
    recipe: Any,
    calib: torch.Tensor,
    options: RunOptions | None = None,
) -> None:
    """Run ``algorithm``'s model-level search if it has one (``Algorithm.model_candidates``) on
    the first ``algorithm.search_samples`` sequences of ``calib``, and tell it the results."""
    algorithm.see_model(source if isinstance(source, nn.Module) else source.model, recipe)
    candidates = algorithm.model_candidates(recipe)
    if candidates:
        src = InMemorySource(source) if isinstance(source, nn.Module) else source
        ids = calib[: algorithm.search_samples]
        algorithm.choose(_search(src, candidates, ids, options or RunOptions(progress=False)))


def _search(
    source: Source, candidates: list[tuple[Any, Any]], ids: torch.Tensor, options: RunOptions
) -> list[tuple[Any, float]]:
    """Score each candidate recipe by the model's output: quantize in place on ``ids``, compare
    the next-token distributions with the float model's, restore the float weights.

    The model is never copied: the float blocks come back from the source (the model's files, or
    for a model given in memory each block's own tensors saved before the search). The whole
    model takes part in each candidate, so a streamed model is loaded for the search."""
    model = source.model
    arch = get_arch(model)
    blocks = decoder_blocks(model, arch)
    prefixes = [f"{arch.blocks}.{i}" for i in range(len(blocks))]
    source.load_outer()
    for p in prefixes:
        source.load(p)
    saved = {p: source.float_state(p) for p in prefixes} if source.in_memory else {}
    linears = {p: dict(_linears(model.get_submodule(p))) for p in prefixes}
    attn_impl = getattr(model.config, "_attn_implementation", None)
    reference = _log_probs(model, ids)
    results = []
    quiet = dataclasses.replace(options, progress=False)
    for value, recipe in candidates:
        try:
            run(_Loaded(source), recipe, ids, quiet)
            results.append((value, _kl(reference, _log_probs(model, ids))))
        finally:
            for p in prefixes:
                _restore(model.get_submodule(p), linears[p], saved[p] if saved else source.float_state(p))
            for block in blocks:
                attn = block.get_submodule(arch.attention)
                if "lowbit_kv" in attn._modules:
                    del attn._modules["lowbit_kv"]
            config: Any = model.config
            config._attn_implementation = attn_impl
    if not source.in_memory:
        for p in prefixes:
            source.release(p)
    return results


class _Loaded:
    """A source whose blocks are all loaded already and must stay so (a search's candidate run)."""

    in_memory = True

    def __init__(self, source: Source) -> None:
        self.model = source.model
        self._source = source

    def load(self, prefix: str) -> None:
        return None

    def load_outer(self) -> None:
        return None

    def release(self, prefix: str) -> None:
        return None

    def float_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return self._source.float_state(prefix)


def _linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def _restore(block: nn.Module, linears: dict[str, nn.Linear], state: dict[str, torch.Tensor]) -> None:
    """Put the block's original linear modules back and its float tensors into them."""
    for name, linear in linears.items():
        block.set_submodule(name, linear)
    missing, unexpected = block.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lowbit_kv" not in m]:
        raise LowbitError(
            f"could not restore the float block after a search: missing {missing}, unexpected {unexpected}"
        )
