"""SmoothQuant (Xiao et al., 2023) as a recipe transform: move activation outliers into weights.

For each smoothing pair of the block (``Arch.smooth``: a norm -> the linears after it, and with
``pairs="all"`` also v_proj -> o_proj and up_proj -> down_proj) the per-input-channel scale is

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with ``max|X_j|`` over every calibration token of the consumers' shared input and ``max|W_j|``
over column ``j`` of all consumers; ``X / s`` and ``W * s`` are folded into the block
exactly (``lowbit.smoothing``). With ``search`` alpha is chosen per pair on the calibration
loss ``sum_c ||Q_a(X / s) Q_w(W_c * s)ᵀ - X W_cᵀ||²`` with the consumers' own specs.

Which pairs: smoothing is for quantized activations (it makes weights harder to make
activations easier), so a pair is smoothed only if at least one of its consumers is a target
with an ``input_activations`` spec; in weight-only schemes the step does nothing, unless
``weight_only=True``: then pairs whose consumers only have quantized weights are smoothed too.
For weight quantization the scale works the other way round: multiplying the weight columns
of salient input channels (large ``max|X_j|``) by ``s_j > 1`` gives them a larger share of
their quantization group's range, so their relative rounding error, which those large
activations amplify, shrinks (SmoothQuant+, AWQ).

Statistics: every fold is an exact equivalence, so folding one pair does not change the
activations any other pair sees (v_proj's output is divided but o_proj's input is the attention
output, which only the v -> o fold changes). All pairs' activations are therefore collected in
one float pass before any fold, each at the input of the pair's first consumer (for v -> o the
attention output, not v_proj's output; for up -> down ``act(gate) * up``). Weights do change:
the v -> o and up -> down folds divide rows of v_proj and up_proj, which are consumers of the
norm pairs. Pairs are therefore folded from last to first, so each pair's ``max|W_j|`` (and
its search loss) sees its consumers' final weights.

SmoothQuant+ (Pan et al., 2023; ``smoothquant_plus``) smooths for 4-bit group-wise weight
quantization with one alpha for the whole model, chosen by the quantized model's output:
the runner quantizes the model in place per candidate alpha (this recipe with the step replaced
by ``smoothquant`` with ``weight_only=True``), restores it, and keeps the alpha whose logits are
closest to the float model's, so the errors of earlier layers count.

The v -> o fold divides the values stored in the KV cache; with a quantized KV cache that
changes what is quantized there (the search loss does not model it).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import PAIRS, InputStats, smoothing_loss, smoothing_sites, transform_sites
from lowbit.errors import LowbitError
from lowbit.scheme import Recipe, Step
from lowbit.smoothing import SmoothSite, fold_scales

SEARCH_ROWS = 4096  # calibration tokens kept per pair for the alpha search (memory and time bound)
MIN_SCALE, MAX_SCALE = 1e-5, 1e5


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_max^alpha / w_max^(1 - alpha)``, kept finite: channels whose activation or weight
    column is all zero get ``s = 1`` (nothing to migrate) and the rest are clamped to [1e-5, 1e5]."""
    x, w = x_max.float(), w_max.float()
    s = x.clamp(min=MIN_SCALE).pow(alpha) / w.clamp(min=MIN_SCALE).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(MIN_SCALE, MAX_SCALE)


def _linears(ctx: BlockContext, names: tuple[str, ...]) -> list[nn.Linear]:
    linears = [ctx.block.get_submodule(n) for n in names]
    assert all(isinstance(lin, nn.Linear) for lin in linears)  # smooth_site checked them
    return [lin for lin in linears if isinstance(lin, nn.Linear)]


@register("smoothquant", kind="transform")
@dataclass
class SmoothQuant(Algorithm):
    """SmoothQuant: ``alpha`` migration strength in [0, 1] (0: scales from the weights only, 1:
    from the activations only); ``pairs`` ``"norms"`` (norm -> linears, as in the paper) or
    ``"all"`` (also v_proj -> o_proj and up_proj -> down_proj); ``search`` picks alpha per pair
    from ``i / grid`` (i = 1 .. grid - 1) on the quantized calibration loss; ``weight_only``
    also smooths pairs whose consumers have quantized weights but float activations (for
    weight-only schemes, as SmoothQuant+ does)."""

    alpha: float = 0.5
    pairs: str = "all"
    search: bool = False
    grid: int = 20
    weight_only: bool = False

    def splits_exactly(self) -> bool:
        return not self.search  # the max |X_j| are all-reduced; a search scores its own share of rows

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {list(PAIRS)}, got {self.pairs!r}")
        if not isinstance(self.search, bool):
            raise ValueError(f"search must be true or false, got {self.search!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 2:
            raise ValueError(f"grid must be an integer >= 2 (alphas i/grid for i = 1 .. grid-1), got {self.grid!r}")
        if not isinstance(self.weight_only, bool):
            raise ValueError(f"weight_only must be true or false, got {self.weight_only!r}")

    def apply(self, ctx: BlockContext) -> None:
        keep_rows = SEARCH_ROWS if self.search else 0
        transform_sites(ctx, self.sites(ctx), keep_rows, functools.partial(self._smooth, ctx))

    def sites(self, ctx: BlockContext) -> list[SmoothSite]:
        """The block's pairs this step smooths (those with a consumer that has quantized
        activations, or with weight_only quantized weights), in the order the block computes them."""
        return smoothing_sites(ctx, functools.partial(self._helps, ctx), self.pairs)

    def _helps(self, ctx: BlockContext, consumer: str) -> bool:
        """Whether smoothing can help ``consumer``: a target with quantized inputs (or weights, with weight_only)."""
        if consumer not in ctx.targets:
            return False
        wspec, aspec = ctx.specs[consumer]
        return aspec is not None or (self.weight_only and wspec is not None)

    def _smooth(self, ctx: BlockContext, site: SmoothSite, stats: InputStats) -> None:
        linears = _linears(ctx, site.consumers)
        w_cols = torch.cat([lin.weight.detach().abs().float() for lin in linears]).amax(0)
        x_max = site.reduce_max(stats.absmax())
        w_max = site.reduce_max(w_cols.to(x_max.device))
        record: dict[str, float] = {}
        alpha = float(self.alpha)
        if self.search:
            alpha, record["smooth_loss"] = self._search(ctx, site, stats, linears, x_max, w_max)
        s = smoothing_scales(x_max, w_max, alpha)
        fold_scales(ctx.block, ctx.arch, site.prev, site.consumers, s)
        record.update(smooth_alpha=alpha, smooth_max_scale=float(s.max()))
        for name in site.consumers:
            if name in ctx.targets:
                ctx.stats.setdefault(name, {}).update(record)

    def _search(
        self,
        ctx: BlockContext,
        site: SmoothSite,
        stats: InputStats,
        linears: list[nn.Linear],
        x_max: torch.Tensor,
        w_max: torch.Tensor,
    ) -> tuple[float, float]:
        """The grid alpha with the smallest quantized output error of the consumers, and that error."""
        assert stats.rows is not None
        x = stats.rows
        quantized = [(lin, ctx.specs[n]) for n, lin in zip(site.consumers, linears, strict=True) if n in ctx.targets]
        lins = [lin for lin, _ in quantized]
        specs = [spec for _, spec in quantized]
        refs = [x @ lin.weight.detach().float().T for lin in lins]
        best: tuple[float, float] | None = None
        for i in range(1, self.grid):
            alpha = i / self.grid
            s_cols = site.expand(smoothing_scales(x_max, w_max, alpha))
            loss = smoothing_loss(x, stats, lins, specs, s_cols, refs)
            if best is None or loss < best[1]:
                best = (alpha, loss)
        assert best is not None
        return best


DEFAULT_ALPHAS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)


@register("smoothquant_plus", kind="transform")
@dataclass
class SmoothQuantPlus(Algorithm):
    """SmoothQuant+ (Pan et al., 2023): smoothing for 4-bit group-wise weight-only quantization,
    with one alpha for the whole model searched on the quantized model's output.

    ``alphas``: the candidate migration strengths, each in [0, 1]; ``pairs``: as SmoothQuant's;
    ``search_samples``: how many calibration sequences (the first ones) the search uses, both
    to quantize each candidate copy and to score it.

    Before the first block the runner (``lowbit.pipeline``) runs, for each candidate, the whole
    recipe with this step replaced by ``smoothquant(alpha, pairs, weight_only=True)`` on the
    search sequences, in place (the float weights are restored after each candidate, from the
    model's files or from the blocks' own saved tensors; the model is never copied), and scores
    it by the mean per-token ``KL(float || quantized)`` of its next-token distributions against
    the float model on the same sequences. The paper
    scores on the model's output loss; the KL needs no labels, is invariant to the constant
    logit offsets a softmax ignores, is zero exactly when the predictions agree, and is the
    measure lowbit's evaluation reports. The lowest-KL alpha (the first on
    ties) is kept in ``self.alpha``, the whole table in ``self.search_results`` as (alpha, KL)
    pairs. ``apply`` then smooths each block exactly as ``smoothquant`` with that alpha
    (``weight_only=True``) and records ``smooth_alpha`` and ``smooth_search_kl`` per consumer.
    """

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    pairs: str = "all"
    search_samples: int = 4

    def __post_init__(self) -> None:
        alphas = self.alphas
        if isinstance(alphas, str | bytes) or not isinstance(alphas, tuple | list) or not alphas:
            raise ValueError(f"alphas must be a non-empty list of numbers in [0, 1], got {alphas!r}")
        for a in alphas:
            if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a <= 1:
                raise ValueError(f"every alpha in alphas must be a number in [0, 1], got {a!r}")
        self.alphas = tuple(float(a) for a in alphas)
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {list(PAIRS)}, got {self.pairs!r}")
        n = self.search_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"search_samples must be an integer >= 1 (calibration sequences), got {n!r}")
        self.alpha: float | None = None
        self.search_kl: float | None = None
        self.search_results: list[tuple[float, float]] = []

    def candidate_recipe(self, recipe: Recipe, alpha: float) -> Recipe:
        """``recipe`` with this step replaced by plain SmoothQuant at ``alpha`` (weight-only pairs too)."""
        steps = tuple(recipe.steps)
        positions = [i for i, step in enumerate(steps) if step.name == self.name]
        if len(positions) != 1:
            raise LowbitError(
                f"smoothquant_plus: the recipe must have exactly one smoothquant_plus step, it has {len(positions)}"
            )
        i = positions[0]
        step = Step("smoothquant", {"alpha": alpha, "pairs": self.pairs, "weight_only": True})
        name = f"{recipe.name} (smoothquant_plus candidate alpha={alpha:g})"
        return dataclasses.replace(recipe, steps=(*steps[:i], step, *steps[i + 1 :]), name=name)

    def model_candidates(self, recipe: Recipe) -> list[tuple[Any, Recipe]]:
        return [(alpha, self.candidate_recipe(recipe, alpha)) for alpha in self.alphas]

    def choose(self, results: list[tuple[Any, float]]) -> None:
        self.search_results = [(float(a), kl) for a, kl in results]
        alpha, kl = min(self.search_results, key=lambda r: r[1])
        if kl == float("inf"):
            raise LowbitError(f"smoothquant_plus: every candidate alpha {list(self.alphas)} gave non-finite logits")
        self.alpha, self.search_kl = alpha, kl

    def apply(self, ctx: BlockContext) -> None:
        if self.alpha is None:
            raise LowbitError(
                "smoothquant_plus has no alpha yet: the runner searches it (model_candidates, choose) "
                "before the first block"
            )
        smooth = SmoothQuant(alpha=self.alpha, pairs=self.pairs, weight_only=True)
        consumers = [c for site in smooth.sites(ctx) for c in site.consumers if c in ctx.targets]
        smooth.apply(ctx)
        for name in consumers:
            ctx.stats.setdefault(name, {})["smooth_search_kl"] = float(self.search_kl or 0.0)
