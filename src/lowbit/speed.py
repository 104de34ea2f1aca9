"""Generation speed: greedy decoding with a KV cache, timed, and the memory-bandwidth bound.

Every path is driven by the same loop (:func:`lowbit.generate.greedy`): one forward pass over
the prompt (prefill), then one pass per decode step with the KV cache. Torch paths compute the
logits of the last position only (``logits_to_keep=1``, as ``generate`` does); the ONNX runner
returns every position's logits.

Decoding one token at batch 1 reads every weight once, so its speed is bounded by memory
bandwidth: ``bound tok/s = batch * bandwidth / bytes read per step``. The bytes are those each
path actually reads: its linear weights as stored (float32, packed int4 + scales, int8 +
scales), lm_head and norms, plus the KV cache at the mean decode length; an embedding table read
only by row lookups is not counted. The bandwidth is a measured large-tensor copy (bytes read +
written per second, best of a few).

Memory is the bytes of the tensors each path holds (weights, codes, scales; for lowbit's
reference path both its codes and its dequantized float32 weights) plus the KV cache at the end
of generation: computed, not the process' resident set, which is process-wide and never shrinks.
All paths are built first and held together, and ``repeat`` rounds run over all of them in turn,
so that a burst of other load on a shared machine spoils one round of each path rather than every
run of one path; the best prefill and decode times are kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.generate import Step, Timing, greedy, torch_step
from lowbit.modules import QuantLinear


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second of a large float32 tensor copy, counting the bytes read and written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_read_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers a forward pass reads for one token: every tensor
    (counted once when shared) except embedding tables, of which a token reads one row (an
    embedding tied to lm_head is counted through lm_head)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        tensors = [*module._parameters.values(), *module._buffers.values()]
        for t in tensors:
            if t is not None:
                seen[t.data_ptr()] = _nbytes(t)
    return sum(seen.values())


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` holds: parameters, buffers and QuantLinear's codes and scales."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.qweight is not None:
            qw = m.qweight
            tensors += [qw.codes, qw.scale, qw.zero_point, qw.g_idx]
            tensors += [t for t in (qw.outlier_idx, qw.outlier_weight) if t is not None]
        if isinstance(m, QuantLinear) and m.bcq is not None:  # BCQ binary codes (LUT-GEMM)
            tensors += [m.bcq.codes, m.bcq.alpha, m.bcq.offset]
    for t in tensors:
        seen[t.data_ptr()] = _nbytes(t)
    return sum(seen.values())


def kv_bytes_per_position(config: Any, element_size: int) -> int:
    """Bytes of keys and values one position of one sequence adds to the cache (all layers)."""
    text = getattr(config, "text_config", None) or config
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * element_size


def float_copy(model: nn.Module) -> nn.Module:
    """A float32 model with lowbit's dequantized weights in plain ``nn.Linear`` layers, and no
    activation or KV-cache quantization: what the original float model costs to run."""
    import copy

    from lowbit.kvcache import KVQuantizer

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.weight.detach().to(torch.float32), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().to(torch.float32), requires_grad=False)
            out.set_submodule(name, lin)
        elif isinstance(m, KVQuantizer):
            m.enabled = False
    return out.to(torch.float32).eval()


# --- the benchmark ------------------------------------------------------------------------------

PATHS = ("fp32", "lowbit", "kernels", "onnxruntime")
PATH_HELP = {
    "fp32": "the float model in PyTorch float32 (lowbit's dequantized weights, or --baseline)",
    "lowbit": "lowbit's QuantLinear (dequantized float32 weights): the accuracy reference",
    "kernels": "torch's int4/int8 CPU kernels (lowbit.kernels), activations in bfloat16",
    "onnxruntime": "the checkpoint exported to ONNX (MatMulNBits), run by onnxruntime",
}


@dataclass
class BenchSettings:
    prompt_len: int = 128
    new_tokens: int = 32  # decode steps timed after the prefill
    batches: tuple[int, ...] = (1, 8)
    paths: tuple[str, ...] = PATHS
    threads: int | None = None  # None: all cores
    dtype: torch.dtype = torch.bfloat16  # activations of the kernels path
    repeat: int = 1  # rounds of timed runs over all paths; the best of each is kept
    baseline: str | None = None
    seed: int = 0
    trust_remote_code: bool = False  # let a model repository run its own code to load

    def check(self) -> None:
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown:
            raise LowbitError(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
        for name in ("prompt_len", "new_tokens", "repeat"):
            if getattr(self, name) < 1:
                raise LowbitError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.batches or min(self.batches) < 1:
            raise LowbitError(f"batch sizes must be at least 1, got {self.batches}")
        if self.threads is not None and self.threads < 1:
            raise LowbitError(f"threads must be at least 1, got {self.threads}")


@dataclass
class Runner:
    """One path ready to time: its step function and what it reads and holds."""

    step: Step
    read_bytes: int  # weights read per decode step
    resident_bytes: int  # tensors held
    kv_element_size: int  # bytes per cached key/value element
    notes: list[str]


@dataclass
class BenchResult:
    model: str
    settings: BenchSettings
    bandwidth: float  # bytes/s
    rows: list[dict[str, Any]]
    skipped: dict[str, str]
    notes: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model": self.model,
            "prompt_len": s.prompt_len,
            "new_tokens": s.new_tokens,
            "threads": s.threads,
            "repeat": s.repeat,
            "baseline": s.baseline,
            "bandwidth_gb_s": self.bandwidth / 1e9,
            "rows": self.rows,
            "skipped": self.skipped,
            "notes": self.notes,
        }


def _torch_runner(model: nn.Module, notes: list[str] | None = None) -> Runner:
    lookup: Any = model.get_input_embeddings
    emb = lookup()
    kv_size = emb.weight.element_size() if isinstance(emb, nn.Embedding) else 4
    return Runner(torch_step(model), weight_read_bytes(model), resident_bytes(model), kv_size, notes or [])


def _build(name: str, model: nn.Module, tokenizer: Any, s: BenchSettings, tmp: str) -> Runner:
    import copy

    if name == "fp32":
        if s.baseline:
            from lowbit.api import load_any

            base, _ = load_any(s.baseline, trust_remote_code=s.trust_remote_code)
            return _torch_runner(base.to(torch.float32).eval(), [f"baseline {s.baseline}"])
        return _torch_runner(float_copy(model), ["dequantized weights in float32 nn.Linear"])
    if name == "lowbit":
        return _torch_runner(model)
    if name == "kernels":
        from lowbit.kernels import use_kernels

        fast = copy.deepcopy(model)
        report = use_kernels(fast, s.dtype)
        return _torch_runner(fast, report.lines())
    return _onnx_runner(model, tokenizer, s, tmp)


def _onnx_runner(model: nn.Module, tokenizer: Any, s: BenchSettings, tmp: str) -> Runner:
    from pathlib import Path

    from lowbit.export import export_model
    from lowbit.export.onnx_runtime import MODEL_FILE, OnnxLM

    out = Path(tmp) / "onnx"
    result = export_model(model, tokenizer, "onnx", out)
    lm = OnnxLM(out, threads=s.threads)

    def step(ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        logits, past = lm(ids, past)
        return logits[:, -1], past

    read, resident = onnx_weight_bytes(out / MODEL_FILE)
    return Runner(step, read, resident, 4, list(result.notes[:1]))


def onnx_weight_bytes(path: Any) -> tuple[int, int]:
    """(bytes read per token, bytes held) of an ONNX model's initializers: read excludes tables
    consumed only by ``Gather`` (embedding lookups)."""
    import math

    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    four_bit = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    read = held = 0
    for init in proto.graph.initializer:
        n = math.prod(init.dims)
        size = (
            (n + 1) // 2
            if init.data_type in four_bit
            else n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        )
        held += size
        if consumers.get(init.name, {"Gather"}) != {"Gather"}:
            read += size
    return read, held


def _timed(runner: Runner, ids: torch.Tensor, s: BenchSettings, best: Timing | None) -> Timing:
    """One timed generation; the best prefill and the best decode so far are kept."""
    if best is None:  # first round: warm up threads, allocator and caches at this batch size
        greedy(runner.step, ids[:, : min(16, ids.shape[1])], 3)
    _, t = greedy(runner.step, ids, s.new_tokens + 1)
    if best is not None:
        t.prefill_s, t.decode_s = min(best.prefill_s, t.prefill_s), min(best.decode_s, t.decode_s)
    return t


def _row(name: str, runner: Runner, t: Timing, kv_pos: int, bandwidth: float) -> dict[str, Any]:
    b = t.batch
    kv_read = kv_pos * runner.kv_element_size * b * (t.prompt_len + (t.steps + 1) / 2)
    per_step = runner.read_bytes + kv_read
    bound = b * bandwidth / per_step
    decode = t.decode_tok_s
    return {
        "path": name,
        "batch": b,
        "prefill_tok_s": t.prefill_tok_s,
        "decode_tok_s": decode,
        "read_mb_per_step": per_step / 1e6,
        "bound_tok_s": bound,
        "of_bound": decode / bound if decode else None,
        "memory_mb": (runner.resident_bytes + kv_pos * runner.kv_element_size * b * (t.prompt_len + t.steps + 1)) / 1e6,
    }


def bench(source: str, settings: BenchSettings, log: Callable[[str], None] | None = None) -> BenchResult:
    """Time greedy generation of the lowbit checkpoint (or any model) ``source`` on each path."""
    import os
    import tempfile

    from lowbit.api import load_any

    settings.check()
    say = log or (lambda _msg: None)
    settings = dataclasses.replace(settings, threads=settings.threads or len(os.sched_getaffinity(0)))
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads or 1)
    try:
        model, tokenizer = load_any(source, trust_remote_code=settings.trust_remote_code)
        config: Any = model.config
        vocab = int((getattr(config, "text_config", None) or config).vocab_size)
        kv_pos = kv_bytes_per_position(config, 1)
        gen = torch.Generator().manual_seed(settings.seed)
        prompts = {b: torch.randint(0, vocab, (b, settings.prompt_len), generator=gen) for b in settings.batches}
        say("measuring copy bandwidth")
        bandwidth = copy_bandwidth()
        skipped: dict[str, str] = {}
        runners: dict[str, Runner] = {}
        best: dict[tuple[str, int], Timing] = {}
        with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
            for name in settings.paths:
                say(f"preparing {name}")
                try:
                    runners[name] = _build(name, model, tokenizer, settings, tmp)
                except Exception as exc:  # a path that cannot be built is reported, not fatal
                    if name != "onnxruntime" and not isinstance(exc, LowbitError):
                        raise
                    skipped[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    say(f"skipping {name}: {skipped[name]}")
            # rounds over all paths, so that a burst of other load on the machine spoils one round
            # of each path rather than every run of one path
            for r in range(settings.repeat):
                for name, runner in runners.items():
                    for b, ids in prompts.items():
                        say(f"round {r + 1}/{settings.repeat}: {name} at batch {b}")
                        best[name, b] = _timed(runner, ids, settings, best.get((name, b)))
        rows = [_row(name, runners[name], t, kv_pos, bandwidth) for (name, _), t in best.items()]
        notes = {name: runner.notes for name, runner in runners.items()}
        _add_ratios(rows)
        return BenchResult(source, settings, bandwidth, rows, skipped, notes)
    finally:
        torch.set_num_threads(before)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {r["batch"]: r for r in rows if r["path"] == "fp32"}
    for r in rows:
        ref = base.get(r["batch"])
        for key in ("prefill", "decode"):
            mine, theirs = r[f"{key}_tok_s"], ref and ref[f"{key}_tok_s"]
            r[f"{key}_x_fp32"] = mine / theirs if mine and theirs else None


def format_bench(result: BenchResult) -> str:
    from lowbit.eval import format_table

    s = result.settings
    head = (
        f"{result.model}: prompt {s.prompt_len} tokens, {s.new_tokens} decode steps, {s.threads} threads, "
        f"best of {s.repeat}; copy bandwidth {result.bandwidth / 1e9:.1f} GB/s"
    )
    columns = [
        ("path", "path"),
        ("batch", "batch"),
        ("prefill_tok_s", "prefill tok/s", ".1f"),
        ("prefill_x_fp32", "x fp32", ".2f"),
        ("decode_tok_s", "decode tok/s", ".1f"),
        ("decode_x_fp32", "x fp32", ".2f"),
        ("read_mb_per_step", "MB read/step", ".1f"),
        ("bound_tok_s", "bound tok/s", ".1f"),
        ("of_bound", "of bound", ".0%"),
        ("memory_mb", "weights+KV MB", ".0f"),
    ]
    lines = [head, format_table(result.rows, columns)]  # type: ignore[arg-type]
    for name, why in result.skipped.items():
        lines.append(f"{name}: skipped ({why})")
    for name, extra in result.notes.items():
        first = extra[0].removeprefix(f"{name}: ") if extra else ""
        lines += [f"{name}: {first}", *(f"  {line}" for line in extra[1:])] if extra else []
    return "\n".join(lines)
