"""AdaRound (Nagel et al., 2020) and BRECQ's block target (Li et al., 2021) as a reconstruct step.

The grid (scales, zero points) is the one the quantizer before it chose (RTN, an MSE observer or
GPTQ's); only the rounding of each weight is learned, between the grid point below it and the
one above (``rounding.adaround_start``: started from the quantizer's codes, so that zero
iterations give them back exactly).

Start (``init``): the paper sets ``h(V)`` to the fractional part, so the soft weights start at
the float weights (``init="fraction"``). From GPTQ's codes that start forgets GPTQ's joint
decisions: the soft phase moves towards the float weights and the annealing rounds from there.
So the default ``init="codes"`` starts at the quantizer's result (``h(V)`` 0.05 from its choice,
inside the clip so gradients flow) and the learner improves on it. On a 32x64 layer with
correlated inputs (``tests/test_adaround.py``, layer target, 300 iterations) the output error
was RTN 2970, GPTQ 167, AdaRound from GPTQ's codes 154, from the fraction 536 (from RTN's 331).

Per weight ``h(V)`` (the rectified sigmoid) is trained with
Adam on

    reconstruction loss + lam * sum(1 - |2 h(V) - 1| ** beta)

with no regulariser during the first ``warmup`` fraction of ``iters`` and ``beta`` decaying
linearly from ``beta_start`` to ``beta_end`` after it; the result is ``h(V) >= 0.5``.

Two targets:

- ``block`` (BRECQ): the block's output against the float block's (``ctx.teacher``), every
  target of the block learned together; mini-batches of ``batch`` calibration sequences (cut to
  their first ``tokens`` positions; default: whole sequences), see ``reconstruction.py``.
  Cutting is exact but trains on the first positions only, which did not carry over to whole
  sequences on the demo model: GPTQ start, 16 x 512 calibration, 200 iterations, block 0's loss
  5.97 -> 2.64 on whole sequences but -> 5.14 on the first 128 positions (block 1: 2.53 / 5.04).
- ``layer`` (AdaRound's asymmetric reconstruction): per layer ``||W X - W~ X~||^2`` with ``X~``
  the layer's input in the block whose earlier layers are already rounded (and ``X~``
  fake-quantized as the layer's activation spec says), and ``X`` the float model's input of the
  layer (``teacher="model"``, from the float path the runner carries), or with
  ``teacher="block"`` the layer's input in the *float* block fed the quantized model's inputs.
  Layers are done in the block's order (true sequential). The loss is
  exact over every calibration token through three Gram matrices ``XᵀX``, ``X~ᵀX``, ``X~ᵀX~``
  (in x in), so a step costs ``out * in * in`` whatever the number of tokens, and ``batch`` /
  ``tokens`` are not used.

Teacher (``teacher``, both targets): "model" (default) matches the float *model* — the block
target the float block's outputs on the float model's own hidden states, the layer target the
float model's input ``X`` of the layer — so a block also corrects the error the blocks before it
left (the papers' asymmetric reconstruction; AutoRound's default); "block" matches the float
block fed the quantized model's inputs (and approximates ``X`` as above). Measured on the demo
(``bench/learned_rounding.py``, 64 x 512 calibration, groups of 64, 1 x 200 bf16 steps): w4a16-ar
+6.29% perplexity, KL 0.091 with "block"; +3.25%, KL 0.075 with "model" (GPTQ: +9.00%, 0.141).
The run report's block error is against the float block on the same inputs, which "model" does
not minimise: it can read higher than GPTQ's while the model's output is closer to the float one.
Runs that carry the float model's path also report ``model_errors`` (and "vs float model" on the
status line): each block's output against the float model's own, what "model" does minimise.

Scale: in training the reconstruction loss is divided by the start's (the quantizer's hard
result: 1 at the start), so ``lam`` weighs the regulariser against the *relative* error whatever
the model's activation scale. The paper's ``lam = 0.01`` was set for CNN activations of order
one; on the tiny test llama (block losses ~4e-4) it froze every weight (the regulariser's
gradient was ~10^4 times the reconstruction's; block error 3.4e-3 as GPTQ), raw 1e-5 gave 2.3e-3
and 1e-7 1.7e-3 at ``lr_iters`` 10, and 1.1e-3 / 1.2e-3 at ``lr_iters`` 30 (100 iterations).

Learning rate: the paper's Adam lr 1e-3 goes with 10k-20k iterations; an affordable run here has
hundreds, and ``V`` must be able to cross its active range (about [-2.4, 2.4]) within them, so
the default ``lr`` is ``lr_iters / iters`` (the paper's product is 10-20), at most
``BLOCK_LR_CAP`` (0.15, the value at the default 200 steps) for the block target: Adam's first
steps move every ``V`` by about ``lr``, and on the demo model (GPTQ start, 4 x 128 calibration)
short runs at the uncapped rate flipped codes on noise and ended worse than GPTQ (25 steps,
lr 1.2: 29 of 30 blocks; of blocks 0-2, 50 steps at lr 0.6: all three, 100 at lr 0.3: block 2),
while 100 steps at lr 0.1 lowered all three.

Defaults per target (``lam`` / ``lr_iters`` left unset), measured: block 0.01 / 30 (tiny llama,
GPTQ grid, 100 iterations: block errors 9.8e-4 and 7.8e-4 against GPTQ's 3.3e-3 and 1.6e-3;
lr_iters 10 gave 1.2e-3 / 9.6e-4, lam 0.1 1.2e-3 / 8.9e-4); layer 0.1 / 10 (the 32x64 layer
above: 154 against GPTQ's 167; 0.01 / 10 gave 170, 0.01 / 30 297, 0.01 / 3 165). The full-batch
layer loss is smooth and rewards small steps; the block's mini-batch loss needs larger ones.

Batch and precision (block target): a step trains on ``batch`` sequences (default 1) with its
gradient passes in bf16 where the device does bf16 natively (``precision="auto"``). Measured on
the demo's blocks 0-2 (GPTQ start, 64 x 512 calibration, ``bench/adaround_blocks.py``): bf16
gave the losses of fp32 (block 0 7.03 -> 3.90 both, 4 sequences x 200 steps; the whole probe
run 343 s against 531 s); for less time 1 sequence x 200 steps (4.58, run 275 s) beat 4 x 100
(4.70, run 260 s); 1 x 100 (5.52, 13 s per block) is the fast end. On the whole demo model,
1 x 200 bf16 kept nearly all of 4 x 200 fp32's gain (KL 0.091 vs 0.089, GPTQ 0.141) at 0.41x
its time (``bench/learned_rounding.py``).

Speed: a step's soft weight and regulariser gradient take few passes over the weights
(``softround.py``) and Adam is fused (``softround.adam``): on a SmolLM2-shaped block, 1 x 512 tokens in
bf16, a step went from 108 ms (the plain autograd formulation) to 78 ms, against 42 ms for the
block's own forward and backward (``bench/adaround_step.py``); the demo's w4a16-ar from 3.5x to
2.9x GPTQ's time, the matmuls being most of what is left on a CPU.

Fewer steps (whole demo model, w4a16-ar, 64 x 512 calibration, ``bench/learned_rounding.py
--set iters=100``): 100 steps at the default lr 0.15 gave +2.48% perplexity, KL 0.0835 at 2.1x
GPTQ's time (200 steps: +3.83%, KL 0.0754, 2.9x); at lr 0.3 +2.30%, KL 0.0889; with
``lr_schedule="linear"`` (auto-round's decay to 0) +2.77%, KL 0.0890. KL, the closer measure of
the model's output, prefers 200 steps at a constant rate, which stays the default. Most of a
run's steps move few weights: on blocks 0-1 (``bench/adaround_blocks.py --undecided``, 16 x 512)
58-64% of a block's weights are still soft when the regulariser starts at step 40, 5-12% at step
60 and at most 0.3% from step 180, at 4, 3 and 2 bits alike; yet those later steps are what
100 more steps bought above.

The result is kept only if its (hard-rounded) loss on the report batches is not above the
start's; otherwise the quantizer's codes stay (``recon_reverted``). Stats per layer:
``recon_loss_start``, ``recon_loss_end`` (block target: the block loss on ``report_batches``
batches, the same on every layer; layer target: the layer's own), ``recon_flipped`` (the share
of codes changed), ``recon_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit.algorithms.softround as softround
from lowbit.algorithms.adaround_layer import layer_input, learn_layer_rounding
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
from lowbit.algorithms.rounding import INITS, LR_SCHEDULES, beta_schedule, check_fraction, lr_at
from lowbit.algorithms.softround import SoftRounding, reference_loss, set_lr
from lowbit.algorithms.toolkit import input_groups
from lowbit.modules import ActQuantizer

TARGETS = ("block", "layer")
DEFAULTS = {"block": (0.01, 30.0), "layer": (0.1, 10.0)}  # (lam, lr_iters), see the module docstring
BLOCK_LR_CAP = 0.15  # the block target's default lr is at most this (the value at 200 steps), see the docstring


@register("adaround", kind="reconstruct")
@dataclass
class AdaRound(Algorithm):
    """AdaRound / BRECQ on the grid of the quantizer before it (see the module docstring).

    ``target``: "block" (BRECQ) or "layer"; ``iters``: Adam steps per block (per layer for
    "layer"); ``lr``: Adam's learning rate on ``V`` (default ``lr_iters / iters``);
    ``lr_schedule``: "constant" or "linear" (decaying to 0 over the steps); ``batch``:
    calibration sequences per step; ``tokens``: positions of each sequence used in training
    (None: all); ``lam``: the regulariser's weight; ``warmup``: the fraction of steps without it;
    ``beta_start`` / ``beta_end``: its exponent's annealing; ``report_batches``: calibration
    batches on which the loss before and after is measured; ``seed``: the mini-batch order;
    ``teacher``: "block" (the float block on the quantized model's inputs) or "model" (the float
    model's own outputs at this block, see ``reconstruction.TEACHERS``).
    """

    needs = frozenset({"inputs", "teacher"})
    data_parallel = False  # trains on its own samples: workers would decide differently

    target: str = "block"
    iters: int = 200
    lr: float | None = None
    lr_iters: float | None = None
    lr_schedule: str = "constant"
    batch: int = 1
    tokens: int | None = None
    lam: float | None = None
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    report_batches: int = 2
    seed: int = 0
    init: str = "codes"
    precision: str = "auto"
    teacher: str = "model"

    def __post_init__(self) -> None:
        check_learner(self)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {self.target!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr is not None:
            check_fraction("lr", self.lr, 1e-12, 1e3)
        if self.lr_iters is not None:
            check_fraction("lr_iters", self.lr_iters, 1e-9, 1e6)
        if self.lam is not None:
            check_fraction("lam", self.lam, 0.0, 1e6)
        check_fraction("warmup", self.warmup, 0.0, 1.0)
        check_fraction("beta_start", self.beta_start, 1.0, 1e3)
        check_fraction("beta_end", self.beta_end, 1.0, self.beta_start)

    def float_path(self) -> bool:
        return self.teacher == "model"

    def learning_rate(self) -> float:
        """``lr``, or ``lr_iters / iters`` (``lr_iters``: 30 for the block target, 10 per layer)."""
        if self.lr is not None:
            return self.lr
        lr_iters = self.lr_iters if self.lr_iters is not None else DEFAULTS[self.target][1]
        lr = lr_iters / max(self.iters, 1)
        return min(lr, BLOCK_LR_CAP) if self.target == "block" and self.lr_iters is None else lr

    def weight(self) -> float:
        """The regulariser's weight ``lam`` (0.01 for the block target, 0.1 per layer)."""
        return self.lam if self.lam is not None else DEFAULTS[self.target][0]

    def apply(self, ctx: BlockContext) -> None:
        names = check_trainable(ctx, "adaround")
        if not names:
            return
        start = time.perf_counter()
        rounders = {
            n: SoftRounding(ctx.targets[n].weight.detach().float(), grid_weight(ctx, n, "adaround"), self.init)
            for n in names
        }
        acts = activation_quantizers(ctx)
        if self.target == "block":
            self._block(ctx, names, rounders, acts)
        else:
            self._layers(ctx, names, rounders, acts)
        for n in names:
            ctx.stats.setdefault(n, {})["recon_seconds"] = time.perf_counter() - start

    # ---- BRECQ: the block output --------------------------------------------------------------

    def _block(self, ctx: BlockContext, names: list[str], rounders: dict[str, SoftRounding], acts: dict) -> None:
        layers = {
            n: StudentLayer(lin, rounders[n].weight if n in rounders else _frozen_weight(lin), acts.get(n))
            for n, lin in ctx.targets.items()
        }
        with student(ctx.block, layers):
            batches = MiniBatches(ctx, self.batch, self.tokens, self.seed, self.precision)
            report = report_batches(ctx, self.report_batches)
            _set_mode(rounders, "hard")
            loss_start = batches.loss(report)
            reference = reference_loss(loss_start)
            _set_mode(rounders, "soft")
            lr = self.learning_rate()
            optimizer = softround.adam(list(rounders.values()), lr)
            bar = tqdm(range(self.iters), desc=f"adaround block {ctx.index}", leave=False, disable=not ctx.progress)
            with torch.enable_grad():
                for step in bar:
                    optimizer.zero_grad(set_to_none=True)
                    set_lr(optimizer, lr_at(step, self.iters, lr, self.lr_schedule))
                    rec = batches.backward(batches.draw(), scale=1.0 / reference)
                    beta = beta_schedule(step, self.iters, self.warmup, self.beta_start, self.beta_end)
                    if beta is not None and self.weight() > 0:
                        for r in rounders.values():
                            r.add_regularizer_grad(self.weight(), beta)
                    optimizer.step()
                    if step % 10 == 0 or step == self.iters - 1:  # the device's only wait in a step
                        bar.set_postfix_str(f"loss {batches.value(rec) * reference:.4g}")
            _set_mode(rounders, "hard")
            loss_end = batches.loss(report) if self.iters else loss_start
        stats = {"recon_loss_start": loss_start, "recon_loss_end": loss_end}
        stats["recon_exact_cut"] = float(batches.exact_cut)
        stats["recon_exact_rows"] = float(batches.exact_rows)
        if not loss_end <= loss_start:  # NaN too: keep the quantizer's codes
            stats["recon_reverted"] = 1.0
            record(ctx, names, stats)
            return
        for n in names:
            ctx.stats.setdefault(n, {})["recon_flipped"] = rounders[n].flipped()
            ctx.qweights[n] = rounders[n].result()
        record(ctx, names, stats)

    # ---- AdaRound: each layer's output ----------------------------------------------------------

    def _layers(self, ctx: BlockContext, names: list[str], rounders: dict[str, SoftRounding], acts: dict) -> None:
        done: set[str] = set()
        for group in input_groups(ctx):
            first = ctx.targets[group[0]]
            a, b, c, n = self._grams(ctx, first, {m: rounders[m] for m in done}, acts, set(rounders))
            for name in group:
                self._layer(ctx, name, rounders[name], a, b, c, n)
            done.update(group)

    def _grams(
        self,
        ctx: BlockContext,
        linear: nn.Linear,
        rounded: dict[str, SoftRounding],
        acts: dict[str, ActQuantizer],
        trained: set[str],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``XᵀX``, ``X~ᵀX``, ``X~ᵀX~`` (in, in) over every calibration token, and their count.
        ``X~``: the block with the ``rounded`` layers at their learned rounding, every activation
        quantizer on (also of activation-only targets), and ``linear``'s own on its input."""
        name = next(n for n, lin in ctx.targets.items() if lin is linear)
        act = acts.get(name)
        width = linear.in_features
        device = linear.weight.device
        a, b, c = (torch.zeros(width, width, device=device) for _ in range(3))
        count = 0
        for r in rounded.values():
            r.mode = "hard"
        layers = {m: StudentLayer(ctx.targets[m], r.weight, acts.get(m)) for m, r in rounded.items()}
        for m, lin in ctx.targets.items():  # activation-only targets quantize their inputs too
            if m not in trained and m in acts:
                layers[m] = StudentLayer(lin, _frozen_weight(lin), acts[m])
        ctx.passes += 2
        for i, (hidden, kwargs) in enumerate(ctx.inputs):
            # X: the float model's input of the layer where the run carries the float path
            x = layer_input(ctx.block, linear, hidden if ctx.float_inputs is None else ctx.float_inputs[i], kwargs)
            with student(ctx.block, layers), torch.no_grad():
                xt = layer_input(ctx.block, linear, hidden, kwargs)
            if act is not None:
                xt = act(xt)
            x, xt = x.reshape(-1, width).float(), xt.reshape(-1, width).float()
            a.addmm_(x.T, x)
            b.addmm_(xt.T, x)
            c.addmm_(xt.T, xt)
            count += x.shape[0]
        return a, b, c, count

    def _layer(
        self,
        ctx: BlockContext,
        name: str,
        rounder: SoftRounding,
        a: torch.Tensor,
        b: torch.Tensor,
        c: torch.Tensor,
        n: int,
    ) -> None:
        w = ctx.targets[name].weight.detach().float()
        loss_start, loss_end = learn_layer_rounding(self, rounder, w, (a, b, c, n), ctx.progress, name)
        stats = ctx.stats.setdefault(name, {})
        stats.update({"recon_loss_start": loss_start, "recon_loss_end": loss_end})
        if not loss_end <= loss_start:  # NaN too
            stats["recon_reverted"] = 1.0
            with torch.no_grad():
                rounder.v.copy_(rounder.v0)  # later layers see the quantizer's codes
            return
        stats["recon_flipped"] = rounder.flipped()
        ctx.qweights[name] = rounder.result()


def _frozen_weight(linear: nn.Linear) -> Callable[[], torch.Tensor]:
    return lambda: linear.weight.detach().float()


def _set_mode(rounders: dict[str, SoftRounding], mode: str) -> None:
    for r in rounders.values():
        r.mode = mode
