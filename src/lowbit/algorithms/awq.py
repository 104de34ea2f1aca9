"""AWQ (Lin et al., 2024, "Activation-aware Weight Quantization") as a recipe transform.

A few input channels of each linear carry much larger activations than the rest ("salient"
channels); their weights matter most for the output. AWQ protects them without mixed precision
by scaling: for a smoothing pair (``Arch.smooth``: norm -> q/k/v, v_proj -> o_proj, norm ->
gate/up, up_proj -> down_proj) the consumers' input columns are multiplied by ``s`` and the
previous op's output channels divided by it (``lowbit.smoothing.fold_scales``, exact), so the
salient columns are quantized on a finer grid relative to their size. Then (``clip``) each
group's weight range is shrunk where that lowers the group's output error.

Scale search, per pair whose consumers include weight-quantized targets:

- statistic: ``x_mean_j`` = mean |X_j| over every calibration token at the consumers' shared
  input (for grouped-query v -> o, averaged over the query-head columns that share value
  channel ``j``);
- candidates ``alpha = i / grid``, i = 0 .. grid - 1, ``s = x_mean^alpha`` (with
  ``duo_scaling``: ``x_mean^alpha / w_mean^(1 - alpha)``, ``w_mean_j`` the mean over rows of
  ``|W_j|`` divided by its quantization group's max, as in newer AutoAWQ), clamped to >= 1e-4
  and normalised to ``s / sqrt(max(s) * min(s))`` as in the reference implementation;
- loss: ``sum_c ||X (Q(W_c diag(s)) diag(s)^-1)ᵀ - X W_cᵀ||²`` over the weight-quantized
  consumers ``c``, on at most ``n_rows`` sampled calibration tokens. This is the paper's
  objective (Eq. 4, the consumers' outputs); AutoAWQ measures the output of the whole module
  the pair feeds (attention for q/k/v, the MLP for gate/up), which needs that module's forward
  with its keyword arguments and costs more. Activation quantization is not modelled (AWQ is a
  weight-only method).
- ``Q`` (both searches) is RTN with each consumer's own weight spec on min-max ranges: the
  reference's pseudo-quantizer, and exactly the RTN that runs next for min-max observers (what
  AWQ schemes use). A spec with another observer gets its own range search only in the
  quantizer step: running it inside every candidate would cost ~30x more with an MSE observer
  (measured), and an MSE search on top of AWQ's clip search clips twice anyway.
- the alpha with the smallest loss is folded (ties: the smaller alpha). Without
  ``duo_scaling`` alpha = 0 gives ``s = 1``, plain RTN, so AWQ is never worse than RTN on this
  loss; ``awq_loss_ratio`` is the best loss over the plain-RTN loss (``s = 1``), always <= 1
  then (with ``duo_scaling`` alpha = 0 is ``1 / w_mean``, and the ratio can exceed 1, as in
  AutoAWQ).

Statistics and order: every fold is an exact equivalence, so one float pass before any fold
gives every pair's input statistics (v_proj's output is divided but o_proj's input is the
attention output, which only the v -> o fold itself changes). Weights do change: the v -> o and
up -> down folds divide rows of v_proj and up_proj, which are consumers of the norm pairs, so
pairs are folded from last to first and each pair's search sees its consumers' final weights
(AutoAWQ searches all pairs on the unscaled block and then applies all scales, so its q/k/v and
gate/up searches see v_proj and up_proj before their rows are divided). After a pair is folded
its stored input rows are divided by ``s``, exactly what the block now feeds the consumers.

Clip search (``clip``), after scaling, for every weight-quantized target except the query and
key projections (AutoAWQ skips them: their error reaches the output only through the softmax
of q·k, which a per-layer output error does not measure; fused qkv projections are skipped for
the same reason): per output channel and quantization group the shrink ratios
``r = 1 - i / clip_grid``, i = 0 .. int(max_shrink * clip_grid) - 1 (AutoAWQ's grid: with the
defaults 1.0, 0.95, ..., 0.55), clamp the group to ``[-r max|w|, r max|w|]`` and keep the ``r``
with the smallest ``||X_g w_gᵀ - X_g Q(clamp(w_g))ᵀ||²``, ``X_g`` the group's input columns on
at most 512 sampled tokens (AutoAWQ's ``n_sample_token``). Channels are one group; a per-tensor
spec gets one ratio for the whole tensor (its single range couples every row). The chosen range
is stored by clamping the float weights, so the quantizer that runs next (RTN or GPTQ) sees
clipped weights and its observer re-derives the range: with a min-max observer that is the
clamped range, so RTN afterwards reproduces exactly the quantization that was searched and GPTQ
starts from the same ranges.

Clipping is not an equivalence: the block after this step computes a (slightly) different
function from the float block, and the pipeline measures errors after transforms against it.

Stats per weight-quantized consumer: ``awq_alpha``, ``awq_loss_ratio``; per clipped target:
``awq_clip_mean`` (the mean chosen ratio).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import InputStats, input_groups
from lowbit.errors import LowbitError
from lowbit.kvcache import kv_paused
from lowbit.primitives import group_index
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec
from lowbit.smoothing import SmoothSite, check_pre_norm, fold_scales, smooth_site

MIN_SCALE = 1e-4  # AutoAWQ clamps scales (and offsets duo_scaling's denominator) by this
CLIP_ROWS = 512  # tokens used by the clip search (AutoAWQ's n_sample_token)
CLIP_CHUNK = 2**24  # elements of the (groups, tokens, outputs) products computed at once
# query and key projections (and fused qkv) are not clipped, as in AutoAWQ
NO_CLIP = re.compile(r"^(q|k)(_proj)?$|^(query|key)$|qkv", re.IGNORECASE)


class ActStats(InputStats):
    """Per-column mean |x| over every token seen, plus ``InputStats``' seeded sample of rows."""

    def __init__(self, keep_rows: int, seed: int = 0) -> None:
        super().__init__(keep_rows, seed)
        self.abs_sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if rows.shape[0] == 0:
            return
        total = rows.abs().sum(0, dtype=torch.float64)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += rows.shape[0]
        super().__call__(rows)

    def abs_mean(self) -> torch.Tensor:
        """Per-column mean |x| (in,) float32."""
        if self.abs_sum is None:
            raise LowbitError("awq: a scaled layer saw no calibration input")
        return (self.abs_sum / self.count).float()

    def sample(self) -> torch.Tensor:
        """The sampled rows (n, in) float32."""
        if self.rows is None:
            raise LowbitError("awq: a scaled layer saw no calibration input")
        return self.rows


def site_mean(site: SmoothSite, per_column: torch.Tensor) -> torch.Tensor:
    """Per-consumer-column values (in,) -> per-``s``-entry means (width,) over the columns using it
    (grouped-query v -> o: the query heads sharing a value channel)."""
    if site.index is None:
        return per_column
    out = torch.zeros(site.width, dtype=per_column.dtype, device=per_column.device)
    return out.scatter_reduce(0, site.index.to(per_column.device), per_column, reduce="mean", include_self=False)


def group_absmax(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """max |w| of each entry's quantization group, (out, in): per group of ``group_size`` columns
    of a row, per row (``channel``) or over the whole tensor (``tensor``)."""
    a = w.abs()
    if spec.granularity == "tensor":
        return a.amax().expand_as(a)
    if spec.granularity != "group":
        return a.amax(1, keepdim=True).expand_as(a)
    g_idx = group_index(w.shape[1], spec.group_size).to(w.device)
    n_groups = int(g_idx.max()) + 1
    per_group = torch.zeros(w.shape[0], n_groups, dtype=a.dtype, device=a.device)
    per_group = per_group.scatter_reduce(1, g_idx.expand_as(a), a, reduce="amax", include_self=True)
    return per_group[:, g_idx]


def search_spec(spec: QuantSpec) -> QuantSpec:
    """``spec`` with min-max ranges: the RTN the searches evaluate (see the module docstring)."""
    if spec.observer == "minmax":
        return spec
    return dataclasses.replace(spec, observer="minmax", observer_args={})


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """AutoAWQ's scale for one alpha: ``x_mean^alpha`` (or ``x_mean^alpha / (w_mean^(1-alpha) + 1e-4)``
    with ``w_mean``), clamped to >= 1e-4, divided by ``sqrt(max * min)``; non-finite entries -> 1."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=MIN_SCALE)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1.0 - alpha) + MIN_SCALE)).clamp(min=MIN_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def scaled_rtn_loss(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    specs: list[QuantSpec],
    refs: list[torch.Tensor],
    s_cols: torch.Tensor,
) -> float:
    """``sum_c ||x (Q(W_c * s) / s)ᵀ - ref_c||²``, ``Q`` the RTN of ``specs[c]``, ``s_cols`` (in,)."""
    total = 0.0
    for w, spec, ref in zip(weights, specs, refs, strict=True):
        ws = w * s_cols
        wq = quantize_weight(ws, spec).dequantize().to(ws.device) / s_cols
        total += float((x @ wq.T - ref).double().pow(2).sum())
    return total


def group_output_errors(x: torch.Tensor, d: torch.Tensor, group: int) -> torch.Tensor:
    """Per output channel and group of ``group`` columns, ``||x_g d_gᵀ||²``: x (n, in), d (out, in)
    -> (out, G). The last group may be shorter (zero padding adds nothing)."""
    n, inp = x.shape
    out = d.shape[0]
    n_groups = math.ceil(inp / group)
    pad = n_groups * group - inp
    if pad:
        x, d = nn.functional.pad(x, (0, pad)), nn.functional.pad(d, (0, pad))
    xg = x.reshape(n, n_groups, group).transpose(0, 1)  # (G, n, g)
    dg = d.reshape(out, n_groups, group).permute(1, 2, 0)  # (G, g, out)
    step = max(1, CLIP_CHUNK // max(1, n_groups * n))
    errs = [torch.bmm(xg, dg[:, :, o : o + step]).pow(2).sum(1) for o in range(0, out, step)]  # (G, chunk) each
    return torch.cat(errs, 1).T


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@register("awq", kind="transform")
@dataclass
class AWQ(Algorithm):
    """AWQ: per-pair activation-aware scales from ``grid`` alphas (``alpha = i / grid``), then
    (``clip``) per-group weight clipping from shrink ratios ``1 - i / clip_grid`` down to above
    ``1 - max_shrink``. ``duo_scaling``: scales from activations and weights (newer AutoAWQ);
    ``n_rows``: calibration tokens sampled for the searches (memory and time bound)."""

    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    clip_grid: int = 20
    duo_scaling: bool = False
    n_rows: int = 4096

    def __post_init__(self) -> None:
        if not _is_int(self.grid) or self.grid < 1:
            raise ValueError(f"grid must be an integer >= 1 (alphas i/grid for i = 0 .. grid-1), got {self.grid!r}")
        for name in ("clip", "duo_scaling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        ms = self.max_shrink
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 < ms < 1:
            raise ValueError(f"max_shrink must be a number in (0, 1) (the largest clipped fraction), got {ms!r}")
        if not _is_int(self.clip_grid) or self.clip_grid < 1:
            raise ValueError(f"clip_grid must be an integer >= 1, got {self.clip_grid!r}")
        if self.clip and self.n_shrink < 2:
            raise ValueError(
                f"clip_grid * max_shrink = {self.clip_grid * ms:g} leaves only the ratio 1 to try "
                "(ratios are 1 - i/clip_grid for i < clip_grid * max_shrink): raise clip_grid or max_shrink"
            )
        if not _is_int(self.n_rows) or self.n_rows < 1:
            raise ValueError(f"n_rows must be an integer >= 1, got {self.n_rows!r}")

    @property
    def n_shrink(self) -> int:
        """How many clip ratios are tried (AutoAWQ: ``int(max_shrink * n_grid)``, rounding noise aside)."""
        return math.floor(self.max_shrink * self.clip_grid + 1e-9)

    def apply(self, ctx: BlockContext) -> None:
        sites = self.sites(ctx)
        clipped = self.clip_targets(ctx) if self.clip else []
        if not sites and not clipped:
            return
        source = _input_sources(ctx, sites)
        stats = {name: ActStats(self.n_rows) for name in {s.observe for s in sites} | {source[n] for n in clipped}}
        # the pipeline pauses the KV quantizer around transforms; called directly, do it here too
        with kv_paused(getattr(ctx.block.get_submodule(ctx.arch.attention), "lowbit_kv", None)):
            ctx.feed_inputs({ctx.block.get_submodule(name): st for name, st in stats.items()})
        for site in reversed(sites):  # last first: a pair's weights are final when its scale is searched
            try:
                self._scale(ctx, site, stats[site.observe])
            except LowbitError as e:
                pair = f"{site.prev} -> {', '.join(site.consumers)}"
                raise LowbitError(f"{ctx.prefix}: awq scales for {pair}: {e}") from None
        for name in clipped:
            self._clip(ctx, name, stats[source[name]].sample())

    def sites(self, ctx: BlockContext) -> list[SmoothSite]:
        """The block's pairs with weight-quantized consumers, in the order the block computes them
        (post-norm blocks, whose norms do not feed the linears, are refused)."""
        sites = [
            smooth_site(ctx.block, ctx.arch, prev, consumers)
            for prev, consumers in ctx.arch.smooth
            if _quantized(ctx, consumers)
        ]
        if sites:
            check_pre_norm(ctx.block, ctx.arch)
        return sites

    def clip_targets(self, ctx: BlockContext) -> list[str]:
        """Weight-quantized targets whose ranges are searched: all but query and key projections."""
        return [n for g in input_groups(ctx) for n in g if not NO_CLIP.search(n.rsplit(".", 1)[-1])]

    # --- scales ------------------------------------------------------------------------------------

    def _scale(self, ctx: BlockContext, site: SmoothSite, stats: ActStats) -> None:
        """Search the pair's alpha, fold its scale, divide the stored input rows by it, report."""
        names = _quantized(ctx, site.consumers)
        weights = [ctx.targets[n].weight.detach().float() for n in names]
        specs = [search_spec(_wspec(ctx, n)) for n in names]
        x = stats.sample()
        x_mean = site_mean(site, stats.abs_mean())
        w_mean = None
        if self.duo_scaling:
            pairs = zip(weights, specs, strict=True)
            normed = torch.cat([w.abs() / group_absmax(w, sp).clamp(min=1e-6) for w, sp in pairs])
            w_mean = site_mean(site, normed.mean(0).to(x_mean.device))
        alpha, s, ratio = self._search(site, x, weights, specs, x_mean, w_mean)
        fold_scales(ctx.block, ctx.arch, site.prev, site.consumers, s)
        stats.rows = x / site.expand(s).to(x.device)  # what the consumers now receive
        for name in names:
            ctx.stats.setdefault(name, {}).update(awq_alpha=alpha, awq_loss_ratio=ratio)

    def _search(
        self,
        site: SmoothSite,
        x: torch.Tensor,
        weights: list[torch.Tensor],
        specs: list[QuantSpec],
        x_mean: torch.Tensor,
        w_mean: torch.Tensor | None,
    ) -> tuple[float, torch.Tensor, float]:
        """The best grid alpha, its scale (width,) and its loss over the plain-RTN loss."""
        weights = [w.to(x.device) for w in weights]
        refs = [x @ w.T for w in weights]

        def loss(s: torch.Tensor) -> float:
            return scaled_rtn_loss(x, weights, specs, refs, site.expand(s).to(x.device))

        base = loss(torch.ones_like(x_mean)) if w_mean is not None else None
        best: tuple[float, torch.Tensor, float] | None = None
        for i in range(self.grid):
            alpha = i / self.grid
            s = awq_scales(x_mean, w_mean, alpha)
            value = loss(s)
            if base is None:
                base = value  # alpha = 0: s = 1, plain RTN
            if best is None or value < best[2]:
                best = (alpha, s, value)
        assert best is not None and base is not None
        return best[0], best[1], best[2] / base if base > 0 else 1.0

    # --- clipping ----------------------------------------------------------------------------------

    def _clip(self, ctx: BlockContext, name: str, x: torch.Tensor) -> None:
        """Search each group's shrink ratio on the group's output error; clamp the weight to it."""
        lin = ctx.targets[name]
        spec = search_spec(_wspec(ctx, name))
        w = lin.weight.detach().float()
        x = x[:: max(1, x.shape[0] // CLIP_ROWS)].to(w.device)  # evenly strided, as AutoAWQ
        group = spec.group_size if spec.granularity == "group" and spec.group_size else w.shape[1]
        g_idx = group_index(w.shape[1], group).to(w.device)
        amax = group_absmax(w, spec)
        best_err: torch.Tensor | None = None
        best_r = torch.ones(w.shape[0], int(g_idx.max()) + 1, device=w.device)
        for i in range(self.n_shrink):
            r = 1.0 - i / self.clip_grid
            bound = amax * r
            try:
                wq = quantize_weight(w.clamp(-bound, bound), spec).dequantize().to(w.device)
            except LowbitError as e:
                raise LowbitError(f"{ctx.prefix}.{name}: {e}") from None
            err = group_output_errors(x, w - wq, group)
            if spec.granularity == "tensor":
                err = err.sum().expand_as(err)  # one range for the tensor: one ratio for all rows
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        bound = amax * best_r[:, g_idx]
        lin.weight.data = w.clamp(-bound, bound).to(lin.weight.dtype)
        ctx.stats.setdefault(name, {})["awq_clip_mean"] = float(best_r.mean())


def _wspec(ctx: BlockContext, name: str) -> QuantSpec:
    spec = ctx.specs[name][0]
    assert spec is not None  # only weight-quantized targets get here
    return spec


def _quantized(ctx: BlockContext, names: tuple[str, ...]) -> list[str]:
    """The names among ``names`` that are targets with a weight spec."""
    return [n for n in names if n in ctx.targets and ctx.specs[n][0] is not None]


def _input_sources(ctx: BlockContext, sites: list[SmoothSite]) -> dict[str, str]:
    """For each weight-quantized target, the module whose input rows stand for its input: its
    pair's observed consumer, else the first member of its input group (they all read one tensor)."""
    source = {c: site.observe for site in sites for c in site.consumers}
    for group in input_groups(ctx):
        first = next((source[n] for n in group if n in source), group[0])
        for n in group:
            source.setdefault(n, first)
    return source
