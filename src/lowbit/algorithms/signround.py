"""SignRound (Cheng et al., 2023; Intel's auto-round) as a reconstruct step.

Per weight an offset ``V`` in [-0.5, 0.5] (start 0) and per group two clipping factors in
[``min_clip``, 1] (start 1) for the group's range; the weight is

    s * (clip(round(W / s + V) + z, qmin, qmax) - z),   (s, z) = qparams(lo * a_lo, hi * a_hi)

with ``round`` straight-through. ``(lo, hi)`` is the range that reproduces the quantizer's grid
(``rounding.grid_range``), so the start (``V = 0``, factors 1) is that quantizer's grid rounded to
nearest: on an RTN grid RTN (a float32 scale may differ in its last bit), on GPTQ's grid its scales
with RTN's rounding of the float weights (GPTQ's own codes are not a point of this
parameterisation). The loss is the block output's reconstruction error (``reconstruction.py``)
against the float model's outputs at this block (``teacher="model"``, the default, as auto-round
does: the quantized model's inputs, the float model's outputs) or the float block's on the same
inputs (``teacher="block"``); every step moves each parameter by ``lr`` against the sign of its gradient
(signed gradient descent, ``lr = 1 / iters`` by default, so an offset can cross its whole range),
then clamps it to its bounds. The parameters with the lowest mini-batch loss seen are kept (as auto-
round does; the loss of a step is the loss of the parameters before its update). The clipping
factors change the scales and zero points, which stay on the scheme's format (same bits, same scale
dtype).

If the result's loss on the report batches is above the start's, the quantizer's weights stay
(``recon_reverted``); on GPTQ's grid the start compared with is GPTQ's own result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.reconstruction import (
    MiniBatches,
    StudentLayer,
    activation_quantizers,
    check_learner,
    check_trainable,
    grid_weight,
    record,
    report_batches,
    student,
)
from lowbit.algorithms.rounding import check_fraction, clipped_qparams, grid_range
from lowbit.algorithms.signweight import contiguous_groups, sign_weight
from lowbit.formats import IntFormat
from lowbit.primitives import SCALE_DTYPES
from lowbit.qweight import QuantizedWeight


class SignRounding:
    """One layer's SignRound parameters: offsets ``v`` (out, in) and clipping factors (out, G)."""

    def __init__(self, w: torch.Tensor, qw: QuantizedWeight) -> None:
        fmt = qw.spec.fmt
        device = w.device
        self.lo, self.hi = (t.to(device) for t in grid_range(qw))  # refuses float grids
        assert isinstance(fmt, IntFormat)
        self.qmin, self.qmax = fmt.qmin, fmt.qmax
        self.w, self.qw = w, qw
        self.g_idx = qw.g_idx.to(device)
        self.group = contiguous_groups(self.g_idx)  # whole contiguous groups: broadcast, no gathers
        self.v = torch.zeros_like(w, requires_grad=True)
        self.clip_lo = torch.ones_like(self.lo, requires_grad=True)
        self.clip_hi = torch.ones_like(self.hi, requires_grad=True)
        self.outliers = None
        if qw.outlier_idx is not None and qw.outlier_weight is not None:
            self.outliers = (qw.outlier_idx.to(device), qw.outlier_weight.to(device, torch.float32))

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.clip_lo, self.clip_hi]

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zp = clipped_qparams(self.lo, self.hi, self.clip_lo, self.clip_hi, self.qw)
        w, q = sign_weight(self.w, self.v, scale, zp, self.g_idx, self.qmin, self.qmax, self.group)
        return w, q, scale, zp

    def weight(self) -> torch.Tensor:
        w = self._grid()[0]
        if self.outliers is not None:  # OWQ's float columns stay as they are
            w = w.index_copy(1, self.outliers[0], self.outliers[1])
        return w

    def clamp_(self, min_clip: float) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            self.clip_lo.clamp_(min_clip, 1.0)
            self.clip_hi.clamp_(min_clip, 1.0)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params(), saved, strict=True):
                p.copy_(s)

    def result(self) -> QuantizedWeight:
        with torch.no_grad():
            _, q, scale, zp = self._grid()
        qw = self.qw
        return dataclasses.replace(
            qw,
            codes=qw.spec.fmt.to_codes(q).to(qw.codes.device),
            scale=scale.to(SCALE_DTYPES[qw.spec.scale_dtype]).to(qw.scale.device),
            zero_point=zp.to(qw.zero_point.device),
        )


@register("signround", kind="reconstruct")
@dataclass
class SignRound(Algorithm):
    """SignRound on the grid of the quantizer before it (see the module docstring).

    ``iters``: signed-gradient steps per block; ``lr``: the step (default ``1 / iters``);
    ``batch``: calibration sequences per step; ``tokens``: positions of each sequence used in
    training (None: all); ``min_clip``: the clipping factors' lower bound; ``report_batches``:
    calibration batches on which the loss before and after is measured; ``seed``: batch order;
    ``teacher``: "block" or "model" (see ``reconstruction.TEACHERS``).
    """

    needs = frozenset({"inputs", "teacher"})
    data_parallel = False  # trains on its own samples: workers would decide differently

    iters: int = 200
    lr: float | None = None
    batch: int = 8
    tokens: int | None = None
    min_clip: float = 0.5
    report_batches: int = 2
    seed: int = 0
    precision: str = "auto"
    teacher: str = "model"

    def __post_init__(self) -> None:
        check_learner(self)
        if self.lr is not None:
            check_fraction("lr", self.lr, 1e-12, 1.0)
        check_fraction("min_clip", self.min_clip, 0.0, 1.0)

    def float_path(self) -> bool:
        return self.teacher == "model"

    def apply(self, ctx: BlockContext) -> None:
        names = check_trainable(ctx, "signround")
        if not names:
            return
        start = time.perf_counter()
        initial = {n: ctx.qweights[n] for n in names}
        learners, stats = self._fit(ctx, names)
        if not stats["recon_loss_end"] <= stats["recon_loss_start"]:  # NaN too: keep the quantizer's
            stats["recon_reverted"] = 1.0
        else:
            for n, learner in learners.items():
                ctx.qweights[n] = learner.result()
                changed = ctx.qweights[n].codes != initial[n].codes
                ctx.stats.setdefault(n, {})["recon_flipped"] = float(changed.float().mean())
        stats["recon_seconds"] = time.perf_counter() - start
        record(ctx, names, stats)

    def fit(self, ctx: BlockContext) -> dict[str, SignRounding]:
        """Train on ``ctx`` and return each target's learner, holding the best parameters seen
        (``ctx.qweights`` untouched)."""
        return self._fit(ctx, check_trainable(ctx, "signround"))[0]

    def _fit(self, ctx: BlockContext, names: list[str]) -> tuple[dict[str, SignRounding], dict[str, float]]:
        learners = {
            n: SignRounding(ctx.targets[n].weight.detach().float(), grid_weight(ctx, n, "signround")) for n in names
        }
        acts = activation_quantizers(ctx)
        layers = {
            n: StudentLayer(lin, learners[n].weight if n in learners else _frozen(lin), acts.get(n))
            for n, lin in ctx.targets.items()
        }
        given = {
            n: StudentLayer(
                lin, _fixed(grid_weight(ctx, n, "signround"), lin) if n in learners else _frozen(lin), acts.get(n)
            )
            for n, lin in ctx.targets.items()
        }
        lr = self.lr if self.lr is not None else 1.0 / max(self.iters, 1)
        params = [p for learner in learners.values() for p in learner.params()]
        with student(ctx.block, given):
            batches = MiniBatches(ctx, self.batch, self.tokens, self.seed, self.precision)
            report = report_batches(ctx, self.report_batches)
            loss_start = batches.loss(report)
        with student(ctx.block, layers):
            best_loss, best = float("inf"), {n: learner.snapshot() for n, learner in learners.items()}
            bar = tqdm(range(self.iters), desc=f"signround block {ctx.index}", leave=False, disable=not ctx.progress)
            with torch.enable_grad():
                for step in bar:
                    for p in params:
                        p.grad = None
                    loss = batches.value(batches.backward(batches.draw()))
                    if loss < best_loss:  # the parameters before this step's update
                        best_loss, best = loss, {n: learner.snapshot() for n, learner in learners.items()}
                    with torch.no_grad():
                        for p in params:
                            if p.grad is not None:
                                p.sub_(lr * torch.sign(p.grad))
                    for learner in learners.values():
                        learner.clamp_(self.min_clip)
                    if step % 10 == 0:
                        bar.set_postfix_str(f"loss {loss:.4g}")
            for n, learner in learners.items():
                learner.restore(best[n])
            loss_end = batches.loss(report)
        stats = {"recon_loss_start": loss_start, "recon_loss_end": loss_end, "recon_best_batch_loss": best_loss}
        return learners, stats


def _frozen(linear: torch.nn.Linear) -> Callable[[], torch.Tensor]:
    return lambda: linear.weight.detach().float()


def _fixed(qw: QuantizedWeight, linear: torch.nn.Linear) -> Callable[[], torch.Tensor]:
    w = qw.dequantize().to(linear.weight.device)
    return lambda: w
