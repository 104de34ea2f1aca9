"""QuantizedWeight: a linear layer's weight as unpacked codes plus scales and zero points.

Layout, for a weight of shape (out, in) split into G groups along the input dimension:

- ``codes``: (out, in) int8/uint8. Integer formats hold the grid value ``q`` (zero point
  included); float formats hold the bit pattern of the grid value.
- ``scale``: (out, G) or (1, 1) for per-tensor, in the spec's scale dtype.
- ``zero_point``: same shape as ``scale``, float32 holding integers (0 for symmetric signed and
  float formats).
- ``g_idx``: (in,) int64, the group of each input column (``arange(in) // group_size`` unless an
  algorithm reordered columns).
- ``outlier_idx`` / ``outlier_weight``: optional (k,) int64 input columns kept in float16 and
  their (out, k) values (OWQ's weak columns); their codes are unused.
- ``lorc_u`` / ``lorc_v``: optional (out, r) and (r, in) float16 low-rank factors of the
  quantization error (LoRC, ``lowbit.lorc``), added to the dequantized weight.

A spec with ``encoding: olive`` holds Olive's outlier-victim pair codes (``lowbit.olive``):
``grid_values()`` decodes the pairs.

``dequantize()`` gives ``scale[:, g_idx] * (q - zero_point[:, g_idx])`` in float32, with the
float columns put back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.clusters import ChannelRangeObserver
from lowbit.errors import LowbitError
from lowbit.observers import Observer, make_observer, row_range
from lowbit.olive import OLIVE_WEIGHT_SAMPLE, olive_decode, olive_encode, olive_grid, olive_scale
from lowbit.primitives import SCALE_DTYPES, RangeFakeQuant, group_index, qparams, quantize
from lowbit.scheme import QuantSpec

TENSOR_FIELDS = ("codes", "scale", "zero_point", "g_idx", "outlier_idx", "outlier_weight", "lorc_u", "lorc_v")


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec
    outlier_idx: torch.Tensor | None = None
    outlier_weight: torch.Tensor | None = None
    lorc_u: torch.Tensor | None = None
    lorc_v: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device`` (dtypes kept)."""
        moved: dict[str, Any] = {}
        for f in TENSOR_FIELDS:
            t = getattr(self, f)
            moved[f] = None if t is None else t.to(device)
        return dataclasses.replace(self, **moved)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    def grid_values(self) -> torch.Tensor:
        """(out, in) float32 grid values ``q`` decoded from the codes."""
        if self.spec.encoding == "olive":
            return olive_decode(self.codes, olive_grid(self.spec.bits))
        return self.spec.fmt.from_codes(self.codes)

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight."""
        scale = self.scale.to(torch.float32)[:, self.g_idx]
        zp = self.zero_point.to(torch.float32)[:, self.g_idx]
        w = (self.grid_values() - zp) * scale
        if self.outlier_idx is not None and self.outlier_weight is not None:
            w[:, self.outlier_idx] = self.outlier_weight.to(torch.float32)
        if self.lorc_u is not None and self.lorc_v is not None:
            w += self.lorc_u.to(torch.float32) @ self.lorc_v.to(torch.float32)
        return w

    @property
    def n_outlier_columns(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    def bits_per_weight(self) -> float:
        """Code bits plus the amortised cost of scales (and zero points when not symmetric), and of
        float columns: 16 bits per kept weight plus a 16-bit index per kept column."""
        out, inp = self.shape
        per_param = self.scale.element_size() * 8 if self.spec.scale_dtype != "pow2" else 8
        extra = self.scale.numel() * per_param
        if not self.spec.symmetric:
            extra += self.zero_point.numel() * self.spec.bits
        extra += self.n_outlier_columns * (16 * out + 16)
        if self.lorc_u is not None:
            extra += 16 * self.lorc_u.shape[1] * (out + inp)  # fp16 LoRC factors
        return self.spec.bits + extra / (out * inp)


def spec_fake_quant(spec: QuantSpec) -> RangeFakeQuant:
    """``fake_quant(x, lo, hi)`` with ``spec``'s format, symmetry and scale dtype (for MSE search)."""
    return RangeFakeQuant(spec.fmt, spec.symmetric, spec.scale_dtype)


def spec_observer(spec: QuantSpec) -> Observer:
    """A stateful activation observer as ``spec`` names it (the MSE one gets the spec's fake-quant)."""
    if spec.granularity == "cluster":  # RPTQ: per-channel ranges, clustered by the quantizer
        return ChannelRangeObserver()
    args = dict(spec.observer_args)
    if spec.observer == "mse":
        args["fake_quant"] = spec_fake_quant(spec)
    return make_observer(spec.observer, **args)


def weight_ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed (lo, hi) of each group of ``w`` (out, in) -> two (out, G) (or (1, 1)) tensors."""
    fake = spec_fake_quant(spec)

    def ranges(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return row_range(rows, spec.observer, fake_quant=fake, **spec.observer_args)

    out, inp = w.shape
    if spec.granularity == "tensor":
        lo, hi = ranges(w.reshape(1, -1))
        return lo.reshape(1, 1), hi.reshape(1, 1)
    if spec.granularity == "channel":
        lo, hi = ranges(w)
        return lo[:, None], hi[:, None]
    gs = spec.group_size
    assert gs is not None
    if gs > inp:
        raise LowbitError(
            f"group_size {gs} is larger than the input dimension {inp}; use a smaller group or per-channel"
        )
    full = (inp // gs) * gs
    lo, hi = ranges(w[:, :full].reshape(-1, gs))
    lo, hi = lo.reshape(out, -1), hi.reshape(out, -1)
    if full < inp:  # a last, shorter group
        lo_t, hi_t = ranges(w[:, full:])
        lo, hi = torch.cat([lo, lo_t[:, None]], 1), torch.cat([hi, hi_t[:, None]], 1)
    return lo, hi


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, ranges: tuple[torch.Tensor, torch.Tensor] | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight (out, in) with ``spec``.

    ``ranges``: optional (lo, hi) per group, e.g. from a clipping search; by default they come
    from the spec's observer. Non-finite weights raise ``LowbitError``.
    """
    if w.dim() != 2:
        raise LowbitError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise LowbitError("the weight contains NaN or inf; the model file is damaged or was trained unstably")
    if spec.encoding == "olive":
        return _olive_weight(w, spec)
    lo, hi = ranges if ranges is not None else weight_ranges(w, spec)
    scale, zp = qparams(lo, hi, spec.fmt, spec.symmetric, spec.scale_dtype)
    g_idx = group_index(w.shape[1], spec.group_size if spec.granularity == "group" else None)
    q = quantize(w, scale[:, g_idx], zp[:, g_idx], spec.fmt)
    return QuantizedWeight(
        codes=spec.fmt.to_codes(q),
        scale=scale.to(SCALE_DTYPES[spec.scale_dtype]),
        zero_point=zp,
        g_idx=g_idx,
        spec=spec,
    )


def _olive_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Olive's pair codes for ``w`` (out, in) with one MSE-chosen scale per tensor or per row."""
    grid = olive_grid(spec.bits)
    rows = w.reshape(1, -1) if spec.granularity == "tensor" else w
    scale = olive_scale(rows, grid, max_values=OLIVE_WEIGHT_SAMPLE)[:, None]  # (1, 1) or (out, 1)
    return QuantizedWeight(
        codes=olive_encode(w / scale, grid),
        scale=scale,
        zero_point=torch.zeros_like(scale),
        g_idx=group_index(w.shape[1], None),
        spec=spec,
    )
