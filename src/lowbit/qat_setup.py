"""The pieces a QAT run is built from: its settings, the student model, the training windows.

The student is the float model (or a lowbit checkpoint, ``start``) with every layer the recipe
targets replaced by a ``QATLinear``; everything else is frozen. Static activation ranges come from
the float model on the first training windows (the spec's observer), or from the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.data import load_texts, tokenize_texts
from lowbit.errors import LowbitError
from lowbit.hooks import forward_hooks
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.preflight import check_recipe, targeted_layers
from lowbit.qat_modules import QATLinear
from lowbit.qat_state import cut_windows, epoch_order
from lowbit.qweight import spec_observer
from lowbit.scheme import QuantSpec, Recipe

DEFAULT_LR = {"grid": 3e-3, "absolute": 1e-5}  # per unit: grid steps per update, or weight units (measured: docs)
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Settings of a QAT run.

    ``steps``: optimizer steps in all (a resumed run goes on to this many, unless the schedule
    decays). ``lr``: AdamW's learning rate for the weights, in ``lr_unit``: ``"grid"`` (default:
    each weight trains as ``w / s``, its group scale, so ``lr`` is the fraction of a grid step a
    weight moves per update; default ``DEFAULT_LR["grid"]``) or ``"absolute"`` (the weight itself;
    default ``DEFAULT_LR["absolute"]``); layers whose weights stay float train in absolute units at
    ``DEFAULT_LR["absolute"]``. ``scale_lr`` for LSQ's scales (default ``lr``; in grid units
    relative to the start scale, see ``lowbit.qat_modules``). ``lr_schedule``: ``"constant"``
    (default), ``"cosine"`` or ``"linear"`` decay to 0 over ``steps`` (then ``steps`` is part of the
    run's fingerprint: a decaying run resumes only to the same end). ``batch_size`` windows of
    ``seq_len`` tokens per step. ``save_every``:
    save the resumable state every this many steps (0: never). ``lsq``: learn the step sizes.
    ``train_weights``: train the weights (default); ``False`` with ``lsq`` keeps every code of the
    start and learns only the step sizes (EfficientQAT's end-to-end training of the quantization
    parameters, Chen et al. 2024: from a GPTQ checkpoint it cannot undo GPTQ's rounding).
    ``distill``: KL to the float model's next-token distribution at ``temperature``; else next-token
    cross entropy on the text. ``weight_decay`` (AdamW, weights only), ``clip_norm`` (gradient norm
    clipping over all trained tensors; 0: none), ``seed`` (the window order),
    ``observe_windows`` (windows on which static activation ranges are observed).
    """

    steps: int = 100
    lr: float | None = None
    lr_unit: str = "grid"
    lr_schedule: str = "constant"
    batch_size: int = 1
    seq_len: int = 512
    save_every: int = 50
    lsq: bool = False
    train_weights: bool = True
    scale_lr: float | None = None
    distill: bool = True
    temperature: float = 1.0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    observe_windows: int = 8

    def check(self) -> None:
        for name in ("steps", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LowbitError(f"QAT {name} must be an integer >= 0, got {value!r}")
        for name in ("batch_size", "observe_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LowbitError(f"QAT {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise LowbitError(f"QAT seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not self.train_weights and not self.lsq:
            raise LowbitError("QAT with train_weights=False trains nothing without lsq: add --lsq to learn the scales")
        if self.lr_unit not in DEFAULT_LR:
            raise LowbitError(f"QAT lr_unit must be one of {', '.join(DEFAULT_LR)}, got {self.lr_unit!r}")
        if self.lr_schedule not in SCHEDULES:
            raise LowbitError(f"QAT lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        for name in ("lr", "scale_lr", "temperature"):
            value = getattr(self, name)
            if value is None and name in ("lr", "scale_lr"):
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
                raise LowbitError(f"QAT {name} must be a positive number, got {value!r}")
        for name in ("weight_decay", "clip_norm"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise LowbitError(f"QAT {name} must be a number >= 0, got {value!r}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default of ``lr_unit``."""
        return DEFAULT_LR[self.lr_unit] if self.lr is None else float(self.lr)

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of the learning rates for the update of step ``step`` (0-based)."""
        if self.lr_schedule == "constant" or not self.steps:
            return 1.0
        t = step / self.steps
        return 1.0 - t if self.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the numbers of every step (``save_every`` does not, nor ``steps``
        under a constant rate); ``lr`` as used."""
        skip = ("steps", "save_every") if self.lr_schedule == "constant" else ("save_every",)
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        out["lr"] = self.learning_rate
        return out


def check_recipe_for_qat(recipe: Recipe) -> None:
    """QAT trains quantized weights (and input activations); it needs a weight spec and no KV cache."""
    if recipe.scheme.weights is None:
        raise LowbitError(
            f"recipe {recipe.name!r} has no weight spec (scheme.weights), and QAT trains quantized weights; "
            "choose a recipe that quantizes weights, e.g. --recipe w4a16"
        )
    if recipe.scheme.kv_cache is not None:
        raise LowbitError(
            f"recipe {recipe.name!r} quantizes the KV cache, which QAT does not train; remove kv_cache from the recipe"
        )


def training_windows(data: str | torch.Tensor, tokenizer: Any, seq_len: int, batch_size: int) -> torch.Tensor:
    """(n, seq_len) windows of the training text (a source's calib split, or a 1-D token tensor)."""
    if isinstance(data, torch.Tensor):
        stream, what = data.reshape(-1).to(torch.int64), "the training tokens"
    else:
        if tokenizer is None:
            raise LowbitError("the model has no tokenizer: pass tokenizer= or token ids as data")
        texts = load_texts(data, "calib")
        stream, what = tokenize_texts(tokenizer, texts), f"the training text {data!r}"
    windows = cut_windows(stream, seq_len)
    if windows.shape[0] < batch_size:
        raise LowbitError(
            f"{what} holds {stream.numel()} tokens: {windows.shape[0]} windows of {seq_len} tokens, fewer than one "
            f"batch of {batch_size}; give more text or a smaller --seq-len / --batch-size"
        )
    return windows


def _observe_static(
    teacher: nn.Module, layers: dict[str, QuantSpec], windows: torch.Tensor, n: int, seed: int
) -> dict[str, Any]:
    """Observed (lo, hi) of each layer's input on ``n`` windows of epoch 0's order, run one at a time."""
    observers = {name: spec_observer(spec) for name, spec in layers.items()}

    def hook(name: str) -> Any:
        return lambda _m, inp, _o: observers[name].update(inp[0].detach())

    first = epoch_order(windows.shape[0], seed, 0)[:n]
    with forward_hooks({teacher.get_submodule(n_): hook(n_) for n_ in observers}), torch.no_grad():
        for i in first.tolist():
            teacher(input_ids=windows[i : i + 1], use_cache=False)
    return {name: o.range() for name, o in observers.items()}


def float_student(
    teacher: nn.Module, recipe: Recipe, windows: torch.Tensor, config: QATConfig
) -> tuple[nn.Module, list[str]]:
    """A copy of ``teacher`` whose targeted layers are ``QATLinear`` on the grid RTN would choose."""
    check_recipe(recipe, teacher)
    targets = targeted_layers(teacher, recipe)
    static = {n: a for n, (_, _, a) in targets.items() if a is not None and not a.dynamic}
    n_observe = min(config.observe_windows, len(windows))
    ranges = _observe_static(teacher, static, windows, n_observe, config.seed) if static else {}
    student = copy.deepcopy(teacher)
    for name, (_, wspec, aspec) in targets.items():
        act = ActQuantizer(aspec) if aspec is not None else None
        if act is not None and name in ranges:
            act.set_range(*ranges[name])
        linear = student.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        try:
            student.set_submodule(name, QATLinear.from_linear(linear, wspec, act, config.lsq, config.lr_unit))
        except LowbitError as e:
            raise LowbitError(f"{name}: {e}") from None
    return student, list(targets)


def checkpoint_student(
    start: nn.Module, teacher: nn.Module, recipe: Recipe, where: str | Path, lsq: bool, unit: str = "absolute"
) -> tuple[nn.Module, list[str]]:
    """``start`` (a loaded lowbit checkpoint) with its ``QuantLinear``s as ``QATLinear``s; its layers
    and specs must be the ones ``recipe`` gives the float ``teacher``."""
    targets = targeted_layers(teacher, recipe)
    have = {n: m for n, m in start.named_modules() if isinstance(m, QuantLinear)}
    if set(have) != set(targets):
        extra, missing = sorted(set(have) - set(targets)), sorted(set(targets) - set(have))
        raise LowbitError(
            f"--from {where}: its quantized layers are not the ones recipe {recipe.name!r} targets "
            f"(only in the checkpoint: {extra[:3]}, only in the recipe: {missing[:3]}); give the checkpoint's "
            "own recipe, or leave --recipe out to use it"
        )
    for name, (_, wspec, aspec) in targets.items():
        layer = have[name]
        got = (layer.qweight.spec if layer.qweight is not None else None, layer.act.spec if layer.act else None)
        if got != (wspec, aspec):
            shown = [s.describe() if s is not None else "none" for s in (*got, wspec, aspec)]
            raise LowbitError(
                f"--from {where}: layer {name} has weights {shown[0]} / activations {shown[1]}, but recipe "
                f"{recipe.name!r} says {shown[2]} / {shown[3]}; leave --recipe out to use the checkpoint's own"
            )
        try:
            start.set_submodule(name, QATLinear.from_quant_linear(layer, lsq, unit))
        except LowbitError as e:
            raise LowbitError(f"--from {where}: {name}: {e}") from None
    return start, list(targets)


def freeze_all_but(
    student: nn.Module, names: list[str], train_weights: bool = True
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Turn off gradients everywhere but the ``QATLinear`` layers ``names``: (weights in grid units,
    weights in absolute units, LSQ scales); with ``train_weights`` False the weights stay frozen too."""
    for p in student.parameters():
        p.requires_grad_(False)
    grid: list[nn.Parameter] = []
    absolute: list[nn.Parameter] = []
    scales: list[nn.Parameter] = []
    for name in names:
        layer = student.get_submodule(name)
        assert isinstance(layer, QATLinear)
        if train_weights:
            layer.weight.requires_grad_(True)
            (grid if layer.grid_units else absolute).append(layer.weight)
        for s in layer.trained_scales():
            s.requires_grad_(True)
            scales.append(s)
    return grid, absolute, scales


def finished_model(student: nn.Module, names: list[str]) -> nn.Module:
    """``student`` with its ``QATLinear``s rounded into ``QuantLinear``s (in place), in eval mode."""
    for name in names:
        layer = student.get_submodule(name)
        assert isinstance(layer, QATLinear)
        student.set_submodule(name, layer.to_quant_linear())
    return student.eval()
