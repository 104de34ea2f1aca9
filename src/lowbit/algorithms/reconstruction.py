"""Block reconstruction, shared by the learned-rounding steps (AdaRound's block target, SignRound).

A reconstruct step runs after the quantizers fixed each target's grid (``ctx.qweights``) and
before the runner swaps in QuantLinears. It turns the float block into a *student*: each
weight-quantized target computes ``F.linear(Q_a(x), W~, b)`` with ``W~`` a differentiable
function of the step's parameters (``StudentLayer.weight``) and ``Q_a`` the layer's activation
fake-quantizer (static ranges from the runner's float pass, dynamic per-token ones computed on
the fly; straight-through gradient). Every block parameter is frozen and the KV quantizer is
paused by the runner, so autograd covers only this block and only the step's parameters.

The loss is BRECQ's reconstruction error of the block output against ``ctx.teacher``: squared
error summed over the hidden size, averaged over tokens. What the teacher is, is the step's
``teacher`` (``TEACHERS``): "block", the float block's outputs on the same inputs (the quantized
model's; computed once by the runner), which the student can match exactly and which leaves the
earlier blocks' error alone; or "model", the float *model's* outputs at this block (the float
block on the float model's own hidden states, a second path the runner carries beside the
quantized one), so that each block also corrects the error the blocks before it left: the
asymmetric target of AdaRound's and BRECQ's papers and AutoRound's default.

``MiniBatches`` draws the calibration batches of each step
(seeded; ``sequences`` per step, slicing rows of a runner batch when fewer than it holds); the
gradient passes run under bf16 autocast where the device does bf16 natively (``precision``
"auto"), the losses that decide what is kept in float32; with ``tokens`` every sequence is
cut to its first ``tokens`` positions, which is exact for a causal block (the first positions'
outputs depend only on the first positions' inputs) and is checked once per block against the
full-length output, falling back to full length when the block's keyword arguments cannot be
cut that way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.base import BlockContext
from lowbit.algorithms.rounding import straight_through
from lowbit.errors import LowbitError
from lowbit.hooks import replaced_forwards
from lowbit.modules import ActQuantizer
from lowbit.qweight import QuantizedWeight


@dataclass
class StudentLayer:
    """One target in the student block: its linear (bias, shapes), its current weight as a
    differentiable function (out, in) float32, and its activation fake-quantizer (or None)."""

    linear: nn.Linear
    weight: Callable[[], torch.Tensor]
    act: ActQuantizer | None


TEACHERS = ("block", "model")  # what a reconstruct step matches, see the module docstring


def check_teacher(teacher: str) -> None:
    if teacher not in TEACHERS:
        raise ValueError(
            f"teacher must be one of {list(TEACHERS)} (the float block on the quantized inputs, or the "
            f"float model's outputs), got {teacher!r}"
        )


def check_learner(params: Any) -> None:
    """The settings AdaRound and SignRound share: ``teacher``, ``iters`` (>= 0), ``batch`` and
    ``report_batches`` (>= 1), ``precision``, ``tokens`` (a positive integer or None)."""
    check_teacher(params.teacher)
    for key in ("iters", "batch", "report_batches"):
        value = getattr(params, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "iters" else 1):
            raise ValueError(f"{key} must be an integer >= {0 if key == 'iters' else 1}, got {value!r}")
    if params.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {params.precision!r}")
    tokens = params.tokens
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens must be a positive integer or null, got {tokens!r}")


def check_trainable(ctx: BlockContext, step: str) -> list[str]:
    """The weight-quantized targets a reconstruct step refines (their initial grids must exist)."""
    if torch.is_inference_mode_enabled():
        raise LowbitError(f"{step} trains rounding variables: call it outside torch.inference_mode()")
    if ctx.teacher is None:
        raise LowbitError(f"{step} is a reconstruct step: run it in a recipe (the runner gives it the float outputs)")
    names = [n for n in ctx.targets if ctx.specs[n][0] is not None]
    missing = [n for n in names if n not in ctx.qweights]
    if missing:
        raise LowbitError(
            f"{step} refines the grid a quantizer chose, but {ctx.prefix}.{missing[0]} has none; "
            "put a quantizer step (rtn, gptq) before it in the recipe"
        )
    return names


def grid_weight(ctx: BlockContext, name: str, step: str) -> QuantizedWeight:
    """The grid weight a quantizer chose for target ``name`` (BCQ's binary codes have no grid to relearn)."""
    qw = ctx.qweights[name]
    if not isinstance(qw, QuantizedWeight):
        raise LowbitError(
            f"{step} relearns the rounding on a grid, but {ctx.prefix}.{name} holds {type(qw).__name__}; "
            "use a grid quantizer (rtn, gptq) before it"
        )
    return qw


def activation_quantizers(ctx: BlockContext) -> dict[str, ActQuantizer]:
    """Each target's input fake-quantizer as the quantized block will have it (static ranges from
    the runner's float pass)."""
    acts = {}
    for name, (_, aspec) in ctx.specs.items():
        if aspec is None:
            continue
        act = ActQuantizer(aspec)
        if not aspec.dynamic:
            if name not in ctx.act_ranges:
                raise LowbitError(f"{ctx.prefix}.{name}: no observed range for its static activation spec")
            act.set_range(*ctx.act_ranges[name])
        acts[name] = act
    return acts


def _layer_forward(layer: StudentLayer) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if layer.act is not None:
            with torch.no_grad():
                xq = layer.act(x.detach())
            x = straight_through(x, xq)
        w = layer.weight()
        b = layer.linear.bias
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    return forward


@contextlib.contextmanager
def student(block: nn.Module, layers: dict[str, StudentLayer]) -> Iterator[None]:
    """The block with ``layers``' forwards replaced and every parameter frozen, for the ``with`` body."""
    saved = [(p, p.requires_grad) for p in block.parameters()]
    items = list(layers.values())
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        with replaced_forwards([layer.linear for layer in items], lambda i: _layer_forward(items[i])):
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def block_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: ``||out - target||^2`` summed over the hidden size, averaged
    over tokens (float32)."""
    out = out[0] if isinstance(out, tuple) else out
    diff = out.float() - target.float()
    return (diff * diff).sum(-1).mean()


def _cut(value: Any, length: int, tokens: int) -> Any:
    """``value`` with its position dimensions of size ``length`` cut to their first ``tokens``:
    dim 0 of a vector (cache positions), dim 1 of a (batch, positions[, features]) tensor
    (position ids, rotary cos/sin), the last two of a 4-d mask (batch, heads, queries, keys).
    Other dimensions stay whole even where their size equals ``length`` (a head size can)."""
    if isinstance(value, torch.Tensor):
        dims = {1: (0,), 2: (1,), 3: (1,), 4: (2, 3)}.get(value.dim(), ())
        for dim in dims:
            if value.shape[dim] == length:
                value = value.narrow(dim, 0, tokens)
        return value
    if isinstance(value, tuple | list):
        return type(value)(_cut(v, length, tokens) for v in value)
    if isinstance(value, dict):  # the block's keyword arguments (position ids, rotary cos/sin, mask)
        return {k: _cut(v, length, tokens) for k, v in value.items()}
    return value


PRECISIONS = ("auto", "bf16", "fp32")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: a CUDA device with bf16 support, or a CPU
    with AVX512-BF16 or AMX (there oneDNN's bf16 matmul is about twice fp32's speed)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def device_room(device: torch.device) -> int:
    """Bytes of ``device`` that a reconstruct step may fill with calibration batches it keeps
    there: a quarter of a GPU's free memory; 0 on the CPU (the stores' batches are already
    there, and reading one is no copy)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) // 4


def _rows(value: Any, batch: int, start: int, count: int) -> Any:
    """``value`` with the batch dimension (dim 0 of size ``batch`` of a tensor of 2 or more
    dimensions: position ids, rotary cos/sin, masks) narrowed to ``count`` rows from ``start``;
    broadcast (size 1) and 1-d tensors (cache positions) stay whole."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch and batch > 1:
            return value.narrow(0, start, count)
        return value
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, batch, start, count) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, batch, start, count) for k, v in value.items()}
    return value


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """The training passes' autocast: bf16 when ``precision`` is "bf16", or "auto" and
    ``bf16_is_fast(device)``; nothing for "fp32". Only the gradient passes use it: the losses
    that decide whether a result is kept (``MiniBatches.loss``) are float32, as the quantized
    model runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MiniBatches:
    """Mini-batches of a block's calibration batches for a reconstruct step.

    A step trains on ``sequences`` calibration sequences: ``ceil(sequences / B)`` of the runner's
    batches of ``B`` sequences (at most all) or, when ``sequences < B``, a slice of ``sequences``
    rows of one of them (the block's keyword arguments sliced the same way where they have a
    batch dimension; checked once against the whole batch's output, whole batches otherwise).
    Drawn without replacement in a seeded random order, reshuffled each epoch; with ``tokens``
    each sequence is cut to its first ``tokens`` positions (checked exact, see the module
    docstring). ``exact_cut`` / ``exact_rows`` say whether the cut / the row slices are in use.
    """

    def __init__(
        self, ctx: BlockContext, sequences: int, tokens: int | None, seed: int, precision: str = "auto"
    ) -> None:
        assert ctx.teacher is not None
        self.precision = precision
        self.ctx, self.teacher = ctx, ctx.teacher
        self._finite: torch.Tensor | None = None  # all losses finite so far (on the device)
        self._held: dict[int, tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = {}
        self._room: int | None = None  # bytes left for batches kept on the device
        n = len(ctx.inputs)
        if n == 0:
            raise LowbitError("a reconstruct step needs calibration inputs")
        per_batch = int(ctx.inputs[0][0].shape[0])
        self.length = int(ctx.inputs[0][0].shape[1])
        self.rows = sequences if sequences < per_batch else None
        self.exact_rows = self.rows is not None and self._rows_are_exact()
        if self.exact_rows:
            assert self.rows is not None
            step = self.rows
            self.units = [(i, r) for i, (h, _) in enumerate(ctx.inputs) for r in range(0, int(h.shape[0]), step)]
            self.per_step = 1
        else:
            self.rows = None
            self.units = [(i, 0) for i in range(n)]
            self.per_step = min(n, max(1, math.ceil(sequences / per_batch)))
        self.tokens = tokens if tokens is not None and tokens < self.length else None
        self.exact_cut = self.tokens is not None and self._cut_is_exact()
        if not self.exact_cut:
            self.tokens = None
        self._gen = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def _same(self, full: torch.Tensor, part: Callable[[], Any]) -> bool:
        try:
            with torch.no_grad():
                got = _first(part())
        except (RuntimeError, ValueError, IndexError):
            return False
        scale = float(full.abs().max()) or 1.0
        return got.shape == full.shape and bool(torch.allclose(got, full, rtol=1e-3, atol=1e-4 * scale))

    def _rows_are_exact(self) -> bool:
        assert self.rows is not None
        hidden, kwargs = self.ctx.inputs[0]
        b, r = int(hidden.shape[0]), self.rows
        with torch.no_grad():
            full = _first(self.ctx.block(hidden, **kwargs))[:r]
        return self._same(full, lambda: self.ctx.block(hidden[:r], **_rows(kwargs, b, 0, r)))

    def _cut_is_exact(self) -> bool:
        assert self.tokens is not None
        hidden, kwargs, _ = self._unit(0)
        t = self.tokens
        with torch.no_grad():
            full = _first(self.ctx.block(hidden, **kwargs))[:, :t]
        return self._same(full, lambda: self.ctx.block(hidden[:, :t], **_cut(kwargs, self.length, t)))

    def draw(self) -> list[int]:
        """The indices (into ``units``) of the next step's batches or batch slices."""
        out: list[int] = []
        while len(out) < self.per_step:
            if not self._order:
                self._order = torch.randperm(len(self.units), generator=self._gen).tolist()
            out.append(self._order.pop())
        return out

    def _batch(self, i: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """Calibration batch ``i`` and its teacher outputs where the block runs. The stores hold
        them on the host, so on a GPU each read is a copy the device waits for; there the first
        reads are kept on the device while a quarter of its free memory holds them."""
        if i in self._held:
            return self._held[i]
        hidden, kwargs = self.ctx.inputs[i]
        got = (hidden, kwargs, self.teacher[i].to(hidden.device))
        if self._room is None:
            self._room = device_room(hidden.device)
        size = 2 * hidden.numel() * hidden.element_size()
        if size <= self._room:
            self._held[i] = got
            self._room -= size
        return got

    def _unit(self, u: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        i, r = self.units[u]
        hidden, kwargs, target = self._batch(i)
        if self.rows is None:
            return hidden, kwargs, target
        b = int(hidden.shape[0])
        n = min(self.rows, b - r)  # the runner's last batch can be short
        return hidden[r : r + n], _rows(kwargs, b, r, n), target[r : r + n]

    def get(self, u: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """Training unit ``u``: (hidden, keyword arguments, teacher outputs), sliced and cut."""
        hidden, kwargs, target = self._unit(u)
        if self.tokens is None:
            return hidden, kwargs, target
        t = self.tokens
        return hidden[:, :t], _cut(kwargs, self.length, t), target[:, :t]

    def backward(self, units: Sequence[int], scale: float = 1.0) -> torch.Tensor:
        """Add the gradients of ``scale`` times the mean loss over ``units``; returns that loss as
        a detached 0-d tensor where the block runs. Nothing here waits for the device: on a GPU a
        ``float`` of the loss per step stalls the queue of kernels, so the callers read it with
        ``value`` only when they need it, and a non-finite loss raises there."""
        total: torch.Tensor | None = None
        for u in units:
            hidden, kwargs, target = self.get(u)
            with autocast(hidden.device, self.precision):
                out = self.ctx.block(hidden, **kwargs)
            loss = block_loss(out, target) * (scale / len(units))
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        finite = torch.isfinite(total)
        self._finite = finite if self._finite is None else self._finite & finite
        return total

    def value(self, loss: torch.Tensor) -> float:
        """``float(loss)``; raises ``FloatingPointError`` if any step's loss so far was not finite
        (a NaN or an infinity in the block's output: the learned parameters are lost with it)."""
        if self._finite is not None and not bool(self._finite):
            raise FloatingPointError("reconstruction loss is not finite")
        return float(loss)

    @torch.no_grad()
    def loss(self, indices: Sequence[int]) -> float:
        """Mean loss over the runner's batches ``indices`` (whole, full length) of the student as it is now."""
        total = 0.0
        for i in indices:
            hidden, kwargs, target = self._batch(i)
            total += float(block_loss(self.ctx.block(hidden, **kwargs), target))
        return total / max(len(indices), 1)


def report_batches(ctx: BlockContext, count: int) -> list[int]:
    """The fixed batches on which a step's loss before and after is measured and compared."""
    return list(range(min(count, len(ctx.inputs))))


def record(ctx: BlockContext, names: Sequence[str], stats: dict[str, float]) -> None:
    """Put the block-level ``stats`` in every refined layer's report entry."""
    for name in names:
        ctx.stats.setdefault(name, {}).update(stats)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
