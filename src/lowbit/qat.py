"""Quantization-aware training (``lowbit qat``): fine-tune a model through its quantizers.

>>> from lowbit import qat
>>> qat.train("demo", "w4a16", "demo", "out/qat", qat.QATConfig(steps=100), start="out/w4a16-g64")

The student is the model with each targeted linear a ``QATLinear`` (``lowbit.qat_modules``):
float32 master weights trained in full through straight-through fake quantization of the weights
(the recipe's weight spec: groups, symmetry, int or float formats) and of the input activations
(dynamic per token, or static with observed ranges), optionally with LSQ step sizes (``lsq``).
Everything else (embeddings, norms, head, biases) is frozen. The loss is the distillation loss
``T^2 KL(teacher || student)`` of the next-token distributions, the teacher being the float model
(``distill``, the default), or next-token cross entropy on the text. AdamW (learning
rate in grid units by default: each weight trains as ``w / s``, ``s`` its group scale, so ``lr``
is the fraction of a grid step per update, ``lr_unit="absolute"`` for the weight itself; constant,
or ``lr_schedule`` cosine / linear decay), gradient-norm clipping, ``steps`` steps of
``batch_size`` windows of ``seq_len`` tokens.

``start``: a lowbit checkpoint (e.g. GPTQ's) to start from: its dequantized weights, scales, zero
points and activation ranges (and every other tensor of it, so smoothing folded into norms stays);
at step 0 the student computes exactly what that checkpoint computes.

Every ``save_every`` steps the state (trained tensors, optimizer, step, data position, RNG) is
written atomically to ``.NAME.qat`` next to the output; ``resume=True`` continues from it, and the
result equals an uninterrupted run's bit for bit (same threads and device). The result is a normal
lowbit checkpoint (``checkpoint.save_quantized``): the final masters rounded on the final grid.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.checkpoint import META_FILE, load_quantized, save_quantized
from lowbit.errors import LowbitError
from lowbit.fakequant import distill_kl, next_token_ce
from lowbit.models import load_model
from lowbit.outdir import check_output
from lowbit.presets import get_preset
from lowbit.qat_modules import QATLinear
from lowbit.qat_setup import (
    DEFAULT_LR,
    QATConfig,
    check_recipe_for_qat,
    checkpoint_student,
    finished_model,
    float_student,
    freeze_all_but,
    training_windows,
)
from lowbit.qat_state import STATE_FILE, batch_indices, load_state, rng_state, save_state, set_rng_state, state_dir
from lowbit.recipes import load_recipe, recipe_from_dict
from lowbit.scheme import Recipe, to_dict

__all__ = ["DEFAULT_LR", "QATConfig", "QATResult", "train"]


@dataclass
class QATResult:
    """``out``: the checkpoint written; ``losses``: the training loss of every step (all of them,
    also those before a resume); ``start_step``: where this call began (0, or the resumed step)."""

    out: Path
    losses: list[float]
    start_step: int
    seconds: float


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _model_id(model: str | nn.Module) -> str:
    if isinstance(model, str):
        return model
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(_sha(t.float()).encode())
    return f"in-memory model {h.hexdigest()[:16]}"


def _start_hashes(start: str | Path) -> Any:
    """The file hashes the start checkpoint's ``lowbit.json`` records (so a changed start is not resumed)."""
    try:
        return json.loads((Path(start) / META_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _resolve(recipe: str | Path | Recipe | None, start: str | Path | None) -> tuple[Recipe, nn.Module | None]:
    """The recipe (given, or the start checkpoint's own) and the loaded start checkpoint."""
    loaded = None
    if start is not None:
        loaded, _, meta = load_quantized(start)
        if recipe is None:
            recipe = recipe_from_dict(meta.get("recipe") or {"scheme": meta.get("scheme") or {}}, f"{start}: recipe")
    if recipe is None:
        raise LowbitError("QAT needs a recipe (--recipe PRESET_OR_FILE), or a checkpoint to start from (--from DIR)")
    if isinstance(recipe, Recipe):
        resolved = recipe
    elif str(recipe).endswith((".yaml", ".yml")) or Path(recipe).is_file():  # as api.resolve_recipe
        resolved = load_recipe(str(recipe))
    else:
        resolved = get_preset(str(recipe))
    check_recipe_for_qat(resolved)
    return resolved, loaded


def _loss(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, config: QATConfig) -> torch.Tensor:
    logits = student(input_ids=batch, use_cache=False).logits
    if not config.distill:
        return next_token_ce(logits, batch)
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits
    return distill_kl(logits, target, config.temperature)


def train(
    model: str | nn.Module,
    recipe: str | Path | Recipe | None,
    data: str | torch.Tensor,
    out: str | Path,
    config: QATConfig | None = None,
    *,
    tokenizer: Any = None,
    start: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
    trust_remote_code: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> QATResult:
    """Train ``model`` (a spec ``load_model`` takes, or a float model in memory, left unchanged)
    with ``recipe``'s quantizers on ``data`` (a text source or a 1-D tensor of token ids) and write
    the quantized checkpoint to ``out``. ``start``: a lowbit checkpoint to start from (``recipe``
    None uses its own). ``on_step(step, loss)`` is called after every step (and after its state
    was saved, when it was)."""
    config = config or QATConfig()
    config.check()
    began = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite, model_dir=model if isinstance(model, str) else None)
    if resume and not (state_dir(out) / STATE_FILE).is_file():  # before anything is loaded
        raise LowbitError(
            f"--resume: there is no QAT run to resume ({state_dir(out) / STATE_FILE} does not exist); run the same "
            "command without --resume"
        )
    resolved, loaded = _resolve(recipe, start)
    teacher: nn.Module
    if isinstance(model, str):
        teacher, tok = load_model(model, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or tok
    else:
        teacher = model
    teacher.eval()
    windows = training_windows(data, tokenizer, config.seq_len, config.batch_size)
    if loaded is not None:
        student, names = checkpoint_student(loaded, teacher, resolved, start or "", config.lsq, config.lr_unit)
    else:
        student, names = float_student(teacher, resolved, windows, config)
    fingerprint = {
        "recipe": to_dict(resolved),
        "model": _model_id(model),
        "start": None if start is None else [str(start), _start_hashes(start)],
        "data": _sha(windows),
        "config": config.fingerprint(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    dev = torch.device(device)
    home = next(teacher.parameters()).device  # a model passed in memory goes back there
    student.to(dev).eval()
    teacher.to(dev)
    try:
        grid, absolute, scales = freeze_all_but(student, names, config.train_weights)
        lr = config.learning_rate
        groups: list[dict[str, Any]] = []
        if grid:
            groups.append({"params": grid, "lr": lr, "weight_decay": config.weight_decay})
        if absolute:  # a grid-less layer in grid units trains at the absolute default
            absolute_lr = lr if config.lr_unit == "absolute" else DEFAULT_LR["absolute"]
            groups.append({"params": absolute, "lr": absolute_lr, "weight_decay": config.weight_decay})
        if scales:
            groups.append({"params": scales, "lr": config.scale_lr or lr, "weight_decay": 0.0})
        base_lrs = [g["lr"] for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        trained = [p for g in groups for p in g["params"]]

        where = state_dir(out)
        step, position, losses = 0, 0, []
        if resume:
            state = load_state(where, fingerprint)
            with torch.no_grad():
                for p, saved in zip(trained, state["tensors"], strict=True):
                    p.copy_(saved.to(p.device))
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            step, position, losses = state["step"], state["position"], list(state["losses"])
        elif (where / STATE_FILE).exists():
            if not overwrite:
                raise LowbitError(
                    f"an interrupted QAT run into {out} left its state in {where}: add --resume to continue it, or "
                    "--overwrite to start again"
                )
            shutil.rmtree(where)
        first = step
        bar = tqdm(total=config.steps, initial=step, desc="qat", unit="step", disable=not progress)
        while step < config.steps:
            batch = windows[batch_indices(position, config.batch_size, len(windows), config.seed)].to(dev)
            optimizer.zero_grad(set_to_none=True)
            loss = _loss(student, teacher, batch, config)
            if not torch.isfinite(loss):
                raise LowbitError(
                    f"the QAT loss is {float(loss)} at step {step + 1}; lower --lr (now {lr:g}) and start again"
                )
            loss.backward()
            if config.clip_norm:
                torch.nn.utils.clip_grad_norm_(trained, config.clip_norm)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * config.lr_factor(step)  # a function of the step: resumes exactly
            optimizer.step()
            for name in names:
                layer = student.get_submodule(name)
                assert isinstance(layer, QATLinear)
                layer.keep_scales_positive()
            step, position = step + 1, position + config.batch_size
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save_state(
                    where,
                    {
                        "fingerprint": fingerprint,
                        "step": step,
                        "position": position,
                        "losses": losses,
                        "tensors": [p.detach().cpu().clone() for p in trained],
                        "optimizer": optimizer.state_dict(),
                        "rng": rng_state(),
                    },
                )
            if on_step is not None:
                on_step(step, losses[-1])
        bar.close()
    finally:
        if not isinstance(model, str):
            teacher.to(home)

    final = finished_model(student, names).to("cpu")
    provenance = {
        "scheme": to_dict(resolved.scheme),
        "recipe": to_dict(resolved),
        "base_model": model if isinstance(model, str) else getattr(teacher.config, "_name_or_path", None),
        "qat": {
            **config.fingerprint(),
            "steps": step,
            "start": "rtn" if start is None else str(start),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "seconds": time.perf_counter() - began,
        },
    }
    try:
        written = save_quantized(final, tokenizer, out, provenance, overwrite=overwrite)
    except OSError as exc:
        raise LowbitError(f"could not write {out} ({exc})") from exc
    shutil.rmtree(where, ignore_errors=True)  # the run is done: nothing is left to resume
    return QATResult(written, losses, first, time.perf_counter() - began)
