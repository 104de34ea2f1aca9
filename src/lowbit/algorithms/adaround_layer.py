"""AdaRound's layer target: one layer's asymmetric reconstruction ``||W X - W~ X~||²`` through
Gram matrices, trained on its own (``learn_layer_rounding``). ``adaround.py``'s ``target: layer``
builds the Gram matrices block by block and calls it per layer; see its docstring for the
defaults and measurements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit.algorithms.softround as softround
from lowbit.algorithms.rounding import beta_schedule, lr_at
from lowbit.algorithms.softround import SoftRounding, reference_loss, set_lr
from lowbit.hooks import StopForward, forward_pre_hooks


class LayerSchedule(Protocol):
    """The training settings ``learn_layer_rounding`` reads (``adaround.AdaRound`` has them)."""

    iters: int
    lr_schedule: str
    warmup: float
    beta_start: float
    beta_end: float

    def learning_rate(self) -> float: ...

    def weight(self) -> float: ...


def gram_loss(
    w: torch.Tensor, grams: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W~ -> ||X Wᵀ - X~ W~ᵀ||² / n`` from ``grams = (XᵀX, X~ᵀX, X~ᵀX~, n)`` for the float weight
    ``w`` (out, in): ``(tr(W XᵀX Wᵀ) - 2 tr(W~ X~ᵀX Wᵀ) + tr(W~ X~ᵀX~ W~ᵀ)) / n``."""
    a, b, c, n = grams
    const = float((w * (w @ a)).sum(dtype=torch.float64))
    k = w @ b.T  # W XᵀX~

    def loss(wt: torch.Tensor) -> torch.Tensor:
        return (const - 2.0 * (wt * k).sum() + (wt * (wt @ c)).sum()) / max(n, 1)

    return loss


def learn_layer_rounding(
    params: LayerSchedule,
    rounder: SoftRounding,
    w: torch.Tensor,
    grams: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    progress: bool = False,
    name: str = "",
) -> tuple[float, float]:
    """Train ``rounder`` on one layer's asymmetric reconstruction loss (``gram_loss``) with
    ``params``' iterations, learning rate, lambda and beta schedule (full batch: the Gram matrices
    hold every token). Leaves ``rounder`` in hard mode; returns the hard loss before and after."""
    loss = gram_loss(w, grams)
    rounder.mode = "hard"
    with torch.no_grad():
        loss_start = float(loss(rounder.weight()))
    reference = reference_loss(loss_start)
    rounder.mode = "soft"
    lr = params.learning_rate()
    optimizer = softround.adam([rounder], lr)
    with torch.enable_grad():
        for step in tqdm(range(params.iters), desc=f"adaround {name}", leave=False, disable=not progress):
            optimizer.zero_grad(set_to_none=True)
            set_lr(optimizer, lr_at(step, params.iters, lr, params.lr_schedule))
            (loss(rounder.weight()) / reference).backward()
            beta = beta_schedule(step, params.iters, params.warmup, params.beta_start, params.beta_end)
            if beta is not None and params.weight() > 0:
                rounder.add_regularizer_grad(params.weight(), beta)
            optimizer.step()
    rounder.mode = "hard"
    with torch.no_grad():
        loss_end = float(loss(rounder.weight()))
    return loss_start, loss_end


def layer_input(block: nn.Module, linear: nn.Linear, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input of ``linear`` when ``block`` runs on one batch (the pass stops there)."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        got.append(inp[0].detach())
        raise StopForward

    with torch.no_grad(), forward_pre_hooks({linear: hook}), contextlib.suppress(StopForward):
        block(hidden, **kwargs)
    return got[0]
