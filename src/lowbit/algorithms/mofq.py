"""MoFQ (Zhang et al., "Integer or Floating Point? New Outlooks for Low-Bit Quantization on Large
Language Models", 2023): per layer, the integer or the floating-point format of the same bits.

Candidates (``format_pair``): the scheme's own spec and its counterpart of the same width:
INT4 <-> FP4 E2M1, INT8 <-> FP8 E4M3 (symmetric, same granularity, group size, observer and
scale dtype, so both cost the same bits per weight). With quantized input activations and
``activations=True`` (weight+activation mode) a layer's weights and activations take the same
family together (an INT8 x INT8 or FP8 x FP8 matmul, as the paper's W8A8); otherwise only the
weights are chosen and activations stay as the scheme says (weight-only mode).

Metrics (``metric``), each lower is better:

- ``tensor``: the quantization error of the tensors themselves,
  ``||Q(W) - W||² / ||W||²`` (plus ``||Q(X) - X||² / ||X||²`` on calibration rows in
  weight+activation mode: relative, so the two tensors weigh alike);
- ``layer``: the layer's output error on calibration inputs, ``||Q(X) Q(W)ᵀ - X Wᵀ||²`` (at most
  ``rows`` sampled token rows per input);
- ``model``: the model's output error, ``KL(float || quantized)`` of the next-token
  distributions on the first ``search_samples`` calibration sequences, with that one layer
  quantized in that format and everything else float. Computed by the runner's model-level
  search (``Algorithm.model_candidates``): one candidate recipe per (layer, format) that
  quantizes only that layer with RTN; the float weights are restored after each. This costs
  two forward passes of the model per layer.

The chosen quantizer is RTN with the spec's observer (the paper's setting: the choice is the
method). The choice is recorded per layer in the run report (``extra``: ``mofq_fp`` 1 for FP,
0 for INT, and both candidates' metric values ``mofq_int_<metric>`` / ``mofq_fp_<metric>``,
plus the tensor errors ``mofq_int_tensor`` / ``mofq_fp_tensor`` for every metric) and in the
checkpoint: each layer's entry in ``lowbit.json``'s layers table holds its own weight (and
activation) spec, which is what loading reads.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.base import Algorithm, BlockContext, register
from lowbit.algorithms.toolkit import InputStats
from lowbit.errors import LowbitError
from lowbit.kvcache import kv_paused
from lowbit.modules import ActQuantizer
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

METRICS = ("tensor", "layer", "model")
# same-width counterparts: the paper's INT4 vs FP4 (E2M1) and INT8 vs FP8 (E4M3)
COUNTERPART = {4: ("int4", "fp4_e2m1"), 8: ("int8", "fp8_e4m3")}
FAMILIES = ("int", "fp")


def format_pair(spec: QuantSpec) -> dict[str, QuantSpec]:
    """``{"int": INT spec, "fp": FP spec}`` of ``spec``'s width (4 or 8 bits): symmetric, and
    otherwise ``spec``'s granularity, group size, dynamism, observer and scale dtype."""
    if spec.bits not in COUNTERPART:
        raise LowbitError(
            f"mofq chooses between INT and FP formats of 4 or 8 bits; {spec.format} has {spec.bits} bits "
            "(use int4/fp4_e2m1 or int8/fp8_e4m3)"
        )
    int_fmt, fp_fmt = COUNTERPART[spec.bits]
    return {
        "int": dataclasses.replace(spec, format=int_fmt, symmetric=True),
        "fp": dataclasses.replace(spec, format=fp_fmt, symmetric=True),
    }


def candidates(
    wspec: QuantSpec, aspec: QuantSpec | None, activations: bool
) -> dict[str, tuple[QuantSpec, QuantSpec | None]]:
    """The (weights, input activations) specs of each family for one layer."""
    weights = format_pair(wspec)
    acts = format_pair(aspec) if aspec is not None and activations else None
    return {f: (weights[f], acts[f] if acts is not None else aspec) for f in FAMILIES}


def relative_error(q: torch.Tensor, x: torch.Tensor) -> float:
    """``||q - x||² / ||x||²`` in float64 (0 for an all-zero ``x``)."""
    den = float(x.double().pow(2).sum())
    return float((q.double() - x.double()).pow(2).sum()) / den if den > 0 else 0.0


def tensor_error(w: torch.Tensor, wspec: QuantSpec, x: torch.Tensor | None, aspec: QuantSpec | None) -> float:
    """The ``tensor`` metric: the weight's relative quantization error, plus the activation rows'
    ``x`` (n, in) when ``aspec`` is given (static specs take their range from ``x`` itself)."""
    w = w.detach().float()
    err = relative_error(quantize_weight(w, wspec).dequantize().to(w.device), w)
    if aspec is not None and x is not None:
        err += relative_error(fake_act(x, aspec), x)
    return err


def layer_error(w: torch.Tensor, wspec: QuantSpec, x: torch.Tensor, aspec: QuantSpec | None) -> float:
    """The ``layer`` metric: ``||Q_a(x) Q_w(W)ᵀ - x Wᵀ||²`` on the rows ``x`` (n, in)."""
    wf = w.detach().float()
    wq = quantize_weight(wf, wspec).dequantize().to(wf.device)
    xq = fake_act(x, aspec) if aspec is not None else x
    return float((xq @ wq.T - x @ wf.T).double().pow(2).sum())


def fake_act(x: torch.Tensor, aspec: QuantSpec) -> torch.Tensor:
    """``x`` fake-quantized with ``aspec`` (a static spec takes the min-max range of ``x``)."""
    act = ActQuantizer(aspec)
    if not aspec.dynamic:
        if aspec.granularity == "cluster":
            act.set_range(x.amin(0), x.amax(0))
        else:
            act.set_range(x.min(), x.max())
    return act(x)


@register("mofq", kind="quantizer")
@dataclass
class MoFQ(Algorithm):
    """MoFQ: ``metric`` ``tensor``, ``layer`` or ``model``; ``activations``: choose the activation
    format together with the weights' (when the scheme quantizes activations); ``rows``: token
    rows kept per input for the data metrics; ``search_samples``: sequences for ``model``."""

    metric: str = "layer"
    activations: bool = True
    rows: int = 4096
    search_samples: int = 4
    data_parallel = False  # the data metrics score each worker's own rows
    choices: dict[str, tuple[float, float]] = field(default_factory=dict, init=False, repr=False)
    _layers: list[tuple[str, QuantSpec, QuantSpec | None]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")
        if not isinstance(self.activations, bool):
            raise ValueError(f"activations must be true or false, got {self.activations!r}")
        for name in ("rows", "search_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # --- the model metric: one candidate recipe per (layer, family) -------------------------------

    def see_model(self, model: nn.Module, recipe: Recipe) -> None:
        """Told the model (a skeleton is enough) before ``model_candidates``: its target layers."""
        self._layers = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and recipe.scheme.is_target(name, module):
                wspec, aspec = recipe.scheme.specs_for(name, module)
                if wspec is not None:
                    self._layers.append((name, wspec, aspec))

    def model_candidates(self, recipe: Recipe) -> list[tuple[Any, Recipe]]:
        if self.metric != "model":
            return []
        if not self._layers:
            raise LowbitError("mofq metric 'model' needs the model's layers (the runner calls see_model first)")
        out = []
        for name, wspec, aspec in self._layers:
            for family, (w, a) in candidates(wspec, aspec, self.activations).items():
                scheme = Scheme(weights=w, input_activations=a, targets=(f"re:{re.escape(name)}",), ignore=())
                out.append(((name, family), Recipe(scheme, (Step("rtn"),), f"mofq-{family}")))
        return out

    def choose(self, results: list[tuple[Any, float]]) -> None:
        kl: dict[str, dict[str, float]] = {}
        for (name, family), loss in results:
            kl.setdefault(name, {})[family] = loss
        self.choices = {name: (v["int"], v["fp"]) for name, v in kl.items()}

    # --- the block step ---------------------------------------------------------------------------

    def apply(self, ctx: BlockContext) -> None:
        names = [n for n in ctx.targets if ctx.specs[n][0] is not None]
        rows = self._rows(ctx, names) if self.metric != "model" or self.activations else {}
        for name in names:
            wspec, aspec = ctx.specs[name]
            assert wspec is not None
            w = ctx.targets[name].weight.detach().float()
            x = rows.get(name)
            cands = candidates(wspec, aspec, self.activations)
            tensor = {f: tensor_error(w, cw, x, ca if self.activations else None) for f, (cw, ca) in cands.items()}
            scores = self._scores(ctx, name, w, x, cands, tensor)
            family = "fp" if scores["fp"] < scores["int"] else "int"  # a tie keeps INT
            chosen_w, chosen_a = cands[family]
            try:
                ctx.qweights[name] = quantize_weight(w, chosen_w)
            except LowbitError as e:
                raise LowbitError(f"{ctx.prefix}.{name}: {e}") from None
            ctx.specs[name] = (chosen_w, chosen_a)
            stats = ctx.stats.setdefault(name, {})
            stats.update({"mofq_fp": float(family == "fp"), "mofq_int_tensor": tensor["int"]})
            stats["mofq_fp_tensor"] = tensor["fp"]
            if self.metric != "tensor":
                stats[f"mofq_int_{self.metric}"], stats[f"mofq_fp_{self.metric}"] = scores["int"], scores["fp"]

    def _scores(
        self,
        ctx: BlockContext,
        name: str,
        w: torch.Tensor,
        x: torch.Tensor | None,
        cands: dict[str, tuple[QuantSpec, QuantSpec | None]],
        tensor: dict[str, float],
    ) -> dict[str, float]:
        if self.metric == "tensor":
            return tensor
        if self.metric == "layer":
            if x is None:
                raise LowbitError(f"{ctx.prefix}.{name}: mofq saw no calibration input for the layer metric")
            return {f: layer_error(w, cw, x, ca) for f, (cw, ca) in cands.items()}
        full = f"{ctx.prefix}.{name}"
        if full not in self.choices:
            raise LowbitError(f"{full}: the model-level search of mofq has no result for this layer")
        kl_int, kl_fp = self.choices[full]
        return {"int": kl_int, "fp": kl_fp}

    def _rows(self, ctx: BlockContext, names: list[str]) -> dict[str, torch.Tensor]:
        """Up to ``rows`` sampled calibration input rows (n, in) of each layer, in one pass."""
        if not ctx.inputs:
            return {}
        stats = {name: InputStats(self.rows) for name in names}
        with kv_paused(getattr(ctx.block.get_submodule(ctx.arch.attention), "lowbit_kv", None)):
            ctx.feed_inputs({ctx.targets[n]: stats[n] for n in names})
        return {n: s.rows for n, s in stats.items() if s.rows is not None}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values``, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return out


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists: Pearson's correlation of their ranks
    (ties averaged); NaN when either has fewer than two distinct values."""
    if len(a) != len(b):
        raise LowbitError(f"rank_correlation needs lists of one length, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va > 0 and vb > 0 else float("nan")
