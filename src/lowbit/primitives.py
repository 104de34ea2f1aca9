"""Pure tensor functions: quantization parameters, quantize, dequantize, fake quantize.

Affine convention: ``real = scale * (q - zero_point)`` with ``q`` on the format's grid.
Integer zero points are integers inside the grid, so 0.0 is always exactly representable.
Rounding is half to even with saturation, as in ONNX ``QuantizeLinear``:
``q = saturate(round(x / scale) + zero_point)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import Format, IntFormat

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "pow2": torch.float32,
}


def _round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Restrict a positive float32 scale to what ``scale_dtype`` can hold (result float32)."""
    if scale_dtype == "pow2":
        # round up to a power of two so the range is never clipped; frexp is exact, whereas
        # log2 rounds a scale just above 2**k down to k and gave a smaller scale (clipping)
        mant, exp = torch.frexp(scale)
        rounded = torch.where(mant == 0.5, scale, torch.ldexp(torch.ones_like(scale), exp))
    else:
        rounded = scale.to(SCALE_DTYPES[scale_dtype]).to(torch.float32)
        # a scale that overflows the narrow dtype saturates to its largest finite value
        big = torch.finfo(SCALE_DTYPES[scale_dtype]).max
        rounded = torch.where(torch.isinf(rounded), torch.full_like(rounded, big), rounded)
    return torch.where(rounded > 0, rounded, torch.ones_like(rounded))


def symmetric_zero_point(fmt: Format) -> int:
    """Zero point of a symmetric grid: 0 for signed/float, the midpoint for unsigned ints."""
    if isinstance(fmt, IntFormat) and not fmt.signed:
        return 2 ** (fmt.bits - 1)
    return 0


def qparams(
    lo: torch.Tensor,
    hi: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    scale_dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping the range ``[lo, hi]`` onto ``fmt``.

    ``lo``, ``hi``: float tensors of one shape (one entry per quantization group). Returns
    ``scale`` (float32, > 0) and ``zero_point`` (float32 holding integers) of that shape.
    Symmetric: ``scale = max(|lo|, |hi|) / half`` with ``half = (qmax - qmin) / 2`` for integer
    grids (7.5 for int4, 127.5 for int8: all 2**bits levels are used and the largest positive
    value may clip by half a step, the convention of the GPTQ reference code, compressed-tensors
    and torch.ao) and ``half = max`` for float grids (448 for FP8 E4M3: nothing clips).
    Asymmetric (integers only): the range is widened to contain 0, ``scale = (hi - lo) /
    (qmax - qmin)`` and ``zero_point = round(qmin - lo / scale)``, as ONNX
    ``DynamicQuantizeLinear``. A group of zeros gets scale 1, so no NaN can appear.
    """
    lo = lo.to(torch.float32)
    hi = hi.to(torch.float32)
    if symmetric:
        zp = symmetric_zero_point(fmt)
        absmax = torch.maximum(lo.abs(), hi.abs())
        half = (fmt.qmax - fmt.qmin) / 2 if isinstance(fmt, IntFormat) else fmt.qmax
        scale = _round_scale(absmax / half, scale_dtype)
        return scale, torch.full_like(scale, float(zp))
    if not isinstance(fmt, IntFormat):
        raise ValueError(f"{fmt.name} is a float format and supports only symmetric quantization")
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = _round_scale((hi - lo) / (fmt.qmax - fmt.qmin), scale_dtype)
    zero_point = torch.round(fmt.qmin - lo / scale).clamp(fmt.qmin, fmt.qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid values ``q = saturate(round(x / scale) + zero_point)`` (float32, broadcasting)."""
    y = x.to(torch.float32) / scale
    if isinstance(fmt, IntFormat):
        return (torch.round(y) + zero_point).clamp_(fmt.qmin, fmt.qmax)
    return fmt.round(y)  # float grids are symmetric: zero_point is 0


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero_point)`` in float32 (broadcasting)."""
    return (q.to(torch.float32) - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Quantize then dequantize; float32 result of ``x``'s shape."""
    return dequantize(quantize(x, scale, zero_point, fmt), scale, zero_point)


def fake_quantize_range(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: Format, symmetric: bool, scale_dtype: str
) -> torch.Tensor:
    """Fake-quantize ``x`` with parameters derived from the range ``[lo, hi]`` (broadcasting)."""
    scale, zp = qparams(lo, hi, fmt, symmetric, scale_dtype)
    return fake_quantize(x, scale, zp, fmt)


@dataclass(frozen=True)
class RangeFakeQuant:
    """``fake_quantize_range`` with a fixed format, symmetry and scale dtype: what an MSE range
    search calls for every candidate range."""

    fmt: Format
    symmetric: bool
    scale_dtype: str

    def __call__(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return fake_quantize_range(x, lo, hi, self.fmt, self.symmetric, self.scale_dtype)

    def squared_error(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Per row of ``x`` (R, N) float32, ``((self(x, lo, hi) - x) ** 2).sum(1)``, bit for bit, with
        one temporary instead of seven (the same operations in the same order, in place)."""
        if not isinstance(self.fmt, IntFormat):
            diff = self(x, lo, hi) - x
            return (diff * diff).sum(1)
        scale, zero_point = qparams(lo, hi, self.fmt, self.symmetric, self.scale_dtype)
        y = x / scale
        y.round_().add_(zero_point).clamp_(self.fmt.qmin, self.fmt.qmax)  # quantize
        y.sub_(zero_point).mul_(scale)  # dequantize
        y.sub_(x)
        return y.mul_(y).sum(1)


def per_token_fake_quantize(x: torch.Tensor, fmt: Format, symmetric: bool, scale_dtype: str) -> torch.Tensor:
    """Dynamic quantization with one range per vector along the last dimension.

    ``x``: (..., H) float. Each row's min/max gives its own scale and zero point.
    Returns float32 of ``x``'s shape.
    """
    xf = x.to(torch.float32)
    lo = xf.amin(dim=-1, keepdim=True)
    hi = xf.amax(dim=-1, keepdim=True)
    return fake_quantize_range(xf, lo, hi, fmt, symmetric, scale_dtype)


def group_index(in_features: int, group_size: int | None) -> torch.Tensor:
    """Group of each input column: ``arange(in) // group_size`` (all 0 when ``group_size`` is None)."""
    cols = torch.arange(in_features, dtype=torch.int64)
    return cols // group_size if group_size else torch.zeros_like(cols)
