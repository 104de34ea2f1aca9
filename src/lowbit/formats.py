"""Number formats: integer grids and ExMy floating-point grids.

A format says which values a quantized number may take, once the scale (and, for integers,
the zero point) has been removed. It knows how to round a real tensor onto its grid (round
half to even, saturate at the ends), and how to turn grid values into small integer codes and
back. Scales, groups and zero points live in :mod:`lowbit.primitives`.

Integer grids: ``intB`` is signed two's complement ``[-2**(B-1), 2**(B-1)-1]``; ``uintB`` is
``[0, 2**B - 1]``. Floating grids follow the OCP conventions: FP8 E4M3 (the ``fn`` variant:
no infinities, max 448), FP8 E5M2 (IEEE-like, max 57344, saturated), FP6 E3M2 (max 28),
FP6 E2M3 (max 7.5), FP4 E2M1 (max 6). Codes of a float format are its bit patterns
``sign | exponent | mantissa`` as uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class IntFormat:
    """An integer grid of ``bits`` bits, signed (two's complement) or unsigned."""

    bits: int
    signed: bool

    is_float = False

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round half to even and saturate to ``[qmin, qmax]``; same dtype as ``x``."""
        return torch.round(x).clamp_(self.qmin, self.qmax)

    def to_codes(self, q: torch.Tensor) -> torch.Tensor:
        """Grid values (float, already integral) -> codes of ``code_dtype``."""
        return q.to(self.code_dtype)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> grid values as float32."""
        return codes.to(torch.float32)


@dataclass(frozen=True)
class FloatFormat:
    """A sign-exponent-mantissa grid with ``ebits`` exponent and ``mbits`` mantissa bits.

    ``max_value`` is the largest finite magnitude (it differs between variants that reserve
    encodings for inf/NaN and those that do not). Subnormals are included. Values beyond
    ``max_value`` saturate to it.
    """

    name: str
    ebits: int
    mbits: int
    max_value: float

    is_float = True

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def qmin(self) -> float:
        return -self.max_value

    @property
    def qmax(self) -> float:
        return self.max_value

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the nearest grid value, ties to even mantissa, saturating; float32 result."""
        x = x.to(torch.float32)
        mag = x.abs().clamp(max=self.max_value)
        # exponent of the binade of each value (frexp: mag = m * 2**e with m in [0.5, 1))
        _, e = torch.frexp(mag)
        exp = (e - 1).clamp(min=self.min_normal_exp)  # subnormals share the smallest binade's step
        step = torch.ldexp(torch.ones_like(mag), exp - self.mbits)
        q = torch.round(mag / step) * step  # exact: division and product by powers of two
        q = q.clamp(max=self.max_value)
        return torch.copysign(q, x)

    @cached_property
    def _table(self) -> torch.Tensor:
        """All ``2**bits`` codes decoded, float32, indexed by the code (NaN for non-finite codes)."""
        codes = torch.arange(2**self.bits, dtype=torch.int64)
        sign = (codes >> (self.ebits + self.mbits)) & 1
        exp = (codes >> self.mbits) & (2**self.ebits - 1)
        man = codes & (2**self.mbits - 1)
        frac = man.to(torch.float64) / 2**self.mbits
        normal = torch.ldexp(1.0 + frac, (exp - self.bias).to(torch.float64))
        sub = torch.ldexp(frac, torch.full_like(frac, self.min_normal_exp))
        val = torch.where(exp == 0, sub, normal)
        val = torch.where(val > self.max_value, torch.full_like(val, float("nan")), val)
        return torch.where(sign == 1, -val, val).to(torch.float32)

    @cached_property
    def _encode_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted finite grid values and their codes (positive zero preferred over negative)."""
        table = self._table
        finite = torch.nonzero(~torch.isnan(table)).flatten()
        neg_zero = 1 << (self.ebits + self.mbits)
        finite = finite[finite != neg_zero]
        vals, order = torch.sort(table[finite])
        return vals, finite[order]

    def to_codes(self, q: torch.Tensor) -> torch.Tensor:
        """Grid values (exactly on the grid) -> uint8 bit patterns."""
        vals, codes = (t.to(q.device) for t in self._encode_index)
        flat = q.to(torch.float32).reshape(-1)
        idx = torch.searchsorted(vals, flat).clamp_(max=len(vals) - 1)
        if not torch.equal(vals[idx], flat):
            raise ValueError(f"values are not on the {self.name} grid; round them first")
        return codes[idx].to(torch.uint8).reshape(q.shape)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 bit patterns -> float32 grid values."""
        return self._table.to(codes.device)[codes.to(torch.int64)]

    def grid(self) -> torch.Tensor:
        """All finite grid values, sorted, float32."""
        return self._encode_index[0]


Format = IntFormat | FloatFormat

FLOAT_FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("fp8_e4m3", 4, 3, 448.0),
        FloatFormat("fp8_e5m2", 5, 2, 57344.0),
        FloatFormat("fp6_e3m2", 3, 2, 28.0),
        FloatFormat("fp6_e2m3", 2, 3, 7.5),
        FloatFormat("fp4_e2m1", 2, 1, 6.0),
    )
}


def get_format(name: str) -> Format:
    """Look up a format by name: ``int2``..``int8``, ``uint2``..``uint8`` or a float format."""
    if name in FLOAT_FORMATS:
        return FLOAT_FORMATS[name]
    for prefix, signed in (("uint", False), ("int", True)):
        rest = name[len(prefix) :]
        if name.startswith(prefix) and rest in ("2", "3", "4", "5", "6", "7", "8"):
            return IntFormat(int(rest), signed)
    raise LowbitError(f"unknown number format {name!r}: use int2..int8, uint2..uint8 or one of {sorted(FLOAT_FORMATS)}")


def format_names() -> list[str]:
    """Every format name accepted by :func:`get_format`."""
    ints = [f"{p}{b}" for p in ("int", "uint") for b in range(2, 9)]
    return ints + sorted(FLOAT_FORMATS)
