"""``QATLinear``: a linear layer that trains through fake-quantized weights and input activations.

The weight is a float32 master (trained); its grid (scale ``(out, G)``, zero point, ``g_idx``) is
fixed when the layer is made (from the spec's observer on the starting weight, exactly as
``quantize_weight`` chooses it, or from a lowbit checkpoint's ``QuantizedWeight``), and learned only
with LSQ (``lsq=True``: the scale becomes a parameter; zero points stay the integers they were).
The forward pass is ``F.linear(A(x), Q(W), b)`` with ``Q`` and a static ``A`` the straight-through
fake quantizers of :mod:`lowbit.fakequant`, the scales taken as the checkpoint stores them (e.g.
float16). A dynamic ``A`` is ``ActQuantizer`` itself with a plain straight-through gradient (its
range comes from the tensor, so nothing clips beyond half a step). ``to_quant_linear()`` rounds
the master on the same grid into the ``QuantLinear`` a checkpoint holds, whose output equals this
layer's (eval) output bit for bit.

Units (``unit``): ``"absolute"`` trains the weight itself, so an AdamW step of ``lr`` moves it by
about ``lr`` whatever its grid. ``"grid"`` trains the latent ``u = w / s`` (``s`` the weight's
group scale as stored), and the forward weight is ``w = u * s``: an AdamW step of ``lr`` moves a
weight by about ``lr * s``, i.e. ``lr`` is the fraction of a grid step per update, the same for
every group. The straight-through gradient reaches ``u`` as ``s * dL/dw`` (inside the range; zero
outside). Started on a checkpoint's grid, ``u`` is exactly the integer ``q - z``. With LSQ in grid
units the scale is also relative: its latent ``r`` (starting at 0) gives ``s = s0 + s0 * r / Q_P``
(``Q_P`` the format's largest grid value), so a step of ``lr`` on ``r`` moves the outermost grid
point by about ``lr`` of a step; ``u`` stays the latent, so ``w = u * s`` follows the scale, and
the scale's gradient is the sum of the path through ``w`` (``u * dL/dw``, straight through, inside
the range) and LSQ's own term (``round(u) - u`` inside, ``qmin - z`` / ``qmax - z`` outside):
``q - z`` of the clamped grid value, the exact derivative of the forward ``s * (clamp(round(u) +
z) - z)`` in ``s``, times LSQ's ``1/sqrt(N*Q_P)``. A static activation scale under LSQ is relative
in the same way (``s0 + s0 * r / Q_P``) with LSQ's gradient as in absolute units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.fakequant import lsq_grad_factor, scale_gradient, ste_fake_quantize, stored_scale, straight_through
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.primitives import SCALE_DTYPES, _round_scale, quantize
from lowbit.qweight import QuantizedWeight, quantize_weight
from lowbit.scheme import QuantSpec

MIN_SCALE = 1e-8  # learned scales are kept above this after every optimizer step (absolute units)
MIN_RELATIVE = 1e-4  # in grid units, above this fraction of their start
UNITS = ("grid", "absolute")


class QATLinear(nn.Module):
    """Fake-quantized linear for training. ``weight`` (out, in) float32 parameter; ``bias`` kept frozen.

    ``wgrid``: the starting ``QuantizedWeight`` whose scale, zero point and ``g_idx`` are the grid
    (None: the weight stays float, e.g. an override without weights). ``act``: the input quantizer
    (static ones with their scale and zero point set). ``lsq``: learn the weight scales and a static
    activation scale with LSQ. ``unit``: ``"grid"`` or ``"absolute"`` (the module docstring); a
    layer without a weight grid trains in absolute units whatever ``unit`` says (``grid_units``).
    """

    bias: torch.Tensor | None
    zero_point: torch.Tensor
    g_idx: torch.Tensor
    act_zero_point: torch.Tensor
    scale0: torch.Tensor  # grid units: the start scales
    act_scale0: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        wgrid: QuantizedWeight | None,
        act: ActQuantizer | None,
        lsq: bool = False,
        unit: str = "absolute",
    ) -> None:
        super().__init__()
        if unit not in UNITS:
            raise LowbitError(f"unknown learning-rate unit {unit!r}: choose one of {', '.join(UNITS)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.wspec: QuantSpec | None = None if wgrid is None else wgrid.spec
        self.act = act
        self.lsq = lsq
        self.grid_units = unit == "grid" and wgrid is not None
        master = weight.detach().to(torch.float32).clone()
        if wgrid is not None:
            if wgrid.n_outlier_columns:
                raise LowbitError("QAT cannot train a weight with float columns (OWQ); start from another checkpoint")
            scale = wgrid.scale.detach().to(torch.float32).clone()
            self.register_buffer("zero_point", wgrid.zero_point.detach().to(torch.float32).clone())
            self.register_buffer("g_idx", wgrid.g_idx.detach().clone())
            self.w_factor = lsq_grad_factor(self._shared(wgrid), wgrid.spec.fmt)
            self.w_qp = float(wgrid.spec.fmt.qmax)
            if self.grid_units:
                self.register_buffer("scale0", scale)
                scale = torch.zeros_like(scale)  # the latent r of s0 + s0 * r / Q_P
                master = master / _round_scale(self.scale0, wgrid.spec.scale_dtype)[:, self.g_idx]
            self.scale = nn.Parameter(scale, requires_grad=lsq)
        self.weight = nn.Parameter(master)
        self.act_scale: nn.Parameter | None = None
        if act is not None and not act.spec.dynamic:
            if act.scale is None or act.zero_point is None:
                raise LowbitError("a static activation quantizer needs its range before training")
            ascale = act.scale.detach().to(torch.float32).clone()
            self.a_qp = float(act.spec.fmt.qmax)
            if self.grid_units:
                self.register_buffer("act_scale0", ascale)
                ascale = torch.zeros_like(ascale)
            self.act_scale = nn.Parameter(ascale, requires_grad=lsq)
            self.register_buffer("act_zero_point", act.zero_point.detach().to(torch.float32).clone())
            self.a_factor = lsq_grad_factor(self.in_features, act.spec.fmt)

    def _shared(self, wgrid: QuantizedWeight) -> int:
        """How many weights share one scale (LSQ's N): a group (the largest), a row or the whole weight."""
        gran = wgrid.spec.granularity
        if gran == "tensor":
            return self.out_features * self.in_features
        if gran == "channel":
            return self.in_features
        return int(torch.bincount(wgrid.g_idx).max())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        wspec: QuantSpec | None,
        act: ActQuantizer | None,
        lsq: bool = False,
        unit: str = "absolute",
    ) -> QATLinear:
        """Start from a float linear: the grid is what ``quantize_weight(weight, wspec)`` chooses."""
        wgrid = quantize_weight(linear.weight, wspec) if wspec is not None else None
        return cls(linear.weight, linear.bias, wgrid, act, lsq, unit)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, lsq: bool = False, unit: str = "absolute") -> QATLinear:
        """Start from a checkpoint's layer: its dequantized weight, scales, zero points and activation range."""
        return cls(layer.weight, layer.bias, layer.qweight, layer.act, lsq, unit)

    def trained_scales(self) -> list[nn.Parameter]:
        """The scales LSQ learns (empty without ``lsq``)."""
        if not self.lsq:
            return []
        out = [self.scale] if self.wspec is not None else []
        return out + ([self.act_scale] if self.act_scale is not None else [])

    @torch.no_grad()
    def keep_scales_positive(self) -> None:
        """After an optimizer step: learned scales above ``MIN_SCALE`` (absolute units) or above
        ``MIN_RELATIVE`` of their start (grid units: the latent ``r >= -Q_P * (1 - MIN_RELATIVE)``)."""
        if not self.lsq:
            return
        if self.wspec is not None:
            self.scale.clamp_(min=-self.w_qp * (1 - MIN_RELATIVE) if self.grid_units else MIN_SCALE)
        if self.act_scale is not None:
            self.act_scale.clamp_(min=-self.a_qp * (1 - MIN_RELATIVE) if self.grid_units else MIN_SCALE)

    def weight_scale(self) -> torch.Tensor:
        """(out, G) float32: the weight scale now (before rounding to the stored dtype), differentiable."""
        if self.grid_units:
            return self.scale0 + self.scale0 * (self.scale / self.w_qp)
        return self.scale

    def activation_scale(self) -> torch.Tensor:
        """The static activation scale now (float32, before rounding to the stored dtype)."""
        assert self.act_scale is not None
        if self.grid_units:
            return self.act_scale0 + self.act_scale0 * (self.act_scale / self.a_qp)
        return self.act_scale

    def _weight_scale(self) -> torch.Tensor:
        assert self.wspec is not None
        s = self.weight_scale()
        s = scale_gradient(s, self.w_factor) if self.lsq else s
        return stored_scale(s, self.wspec.scale_dtype)

    def master_weight(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """(out, in) float32: the unrounded weight ``w`` (``u * s`` in grid units, ``scale`` the
        stored (out, G) scale, computed when not given)."""
        if not self.grid_units:
            return self.weight
        scale = self._weight_scale() if scale is None else scale
        return self.weight * scale[:, self.g_idx]

    def fake_weight(self) -> torch.Tensor:
        """(out, in) float32: the weight as the forward pass uses it (fake-quantized, or float)."""
        if self.wspec is None:
            return self.weight
        grouped = self._weight_scale()
        scale = grouped[:, self.g_idx]
        return ste_fake_quantize(self.master_weight(grouped), scale, self.zero_point[:, self.g_idx], self.wspec.fmt)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        if act is None:
            return x
        if self.act_scale is None:  # dynamic
            return straight_through(x, act)
        s = self.activation_scale()
        s = scale_gradient(s, self.a_factor) if self.lsq else s
        return ste_fake_quantize(x, stored_scale(s, act.spec.scale_dtype), self.act_zero_point, act.spec.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.fake_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The ``QuantLinear`` of the current master rounded on the current grid (scales as stored)."""
        qweight = None
        weight = self.weight.detach()
        if self.wspec is not None:
            spec = self.wspec
            scale = _round_scale(self.weight_scale().detach(), spec.scale_dtype)
            weight = self.master_weight(scale).detach()
            q = quantize(weight, scale[:, self.g_idx], self.zero_point[:, self.g_idx], spec.fmt)
            qweight = QuantizedWeight(
                codes=spec.fmt.to_codes(q),
                scale=scale.to(SCALE_DTYPES[spec.scale_dtype]),
                zero_point=self.zero_point.clone(),
                g_idx=self.g_idx.clone(),
                spec=spec,
            )
        act = None
        if self.act is not None:
            act = ActQuantizer(self.act.spec)
            if self.act_scale is not None:
                scale = _round_scale(self.activation_scale().detach(), self.act.spec.scale_dtype)
                act.set_qparams(scale, self.act_zero_point.clone())
        return QuantLinear(qweight, self.bias, act, float_weight=weight, dtype=torch.float32)

    def extra_repr(self) -> str:
        w = self.wspec.describe() if self.wspec is not None else "float"
        a = f", act={self.act.spec.describe()}" if self.act is not None else ""
        unit = "grid" if self.grid_units else "absolute"
        return f"in={self.in_features}, out={self.out_features}, w={w}{a}, lsq={self.lsq}, unit={unit}"
