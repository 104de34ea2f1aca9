"""Olive's outlier-victim pair (OVP) encoding (Guo et al., "OliVe", ISCA 2023): pure functions.

Values are taken in adjacent pairs along the last dimension, in units of the scale (``y = x / s``).

- A *normal* pair keeps both values on the symmetric integer grid ``[-qmax, qmax]`` (int4: +-7,
  int8: +-127), rounded half to even; the code is the integer itself.
- An *outlier* is a value with ``|y|`` past the normal range (see ``OliveGrid.threshold``). It is
  coded in *abfloat*: an ExMy float (E2M1 for 4 bits, E4M3 for 8 bits; sign-magnitude bit pattern
  ``s | e | m``) whose value is ``2**(e + bias) * (1 + m / 2**M)`` with ``bias = bits - 1``, so that
  ``2**bias = qmax + 1``: the abfloat range starts where the integer grid ends. Its neighbour, the
  *victim*, is set to 0 and its code becomes the identifier ``-2**(bits-1)`` (-8 / -128), the code a
  symmetric integer grid never uses. A pair with two outliers keeps the larger magnitude (the first
  on a tie) and sacrifices the other.
- The abfloat pattern with ``e = m = 0`` is never used: with the sign bit set it *is* the identifier's
  bit pattern (``1000`` / ``10000000``), and (as the reference implementation) its positive twin is
  dropped too, so the smallest outlier magnitude is ``2**bias * (1 + 2**-M)`` (12 for int4, 144
  for int8).

Choices where the paper does not pin the detail (said here once): a value is an outlier when
``|y|`` is past the midpoint between ``qmax`` and the smallest abfloat magnitude (the union grid's
nearest-value rule; a value exactly on the midpoint stays normal); abfloat rounds half to even in
the mantissa and saturates at its largest magnitude; the scale is chosen per tensor (or per row) by
the quantization MSE over ``alpha = r * max(|mean +- 3 std|)`` with ``s = alpha / qmax``, ``r`` from
0.75 to 2.5 (the reference's search range). Codes are int8 tensors holding ``bits``-bit two's
complement values, so they pack like ordinary signed integer codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class OliveGrid:
    """The normal integer grid and the abfloat outlier format of one bit width."""

    bits: int
    ebits: int
    mbits: int

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def identifier(self) -> int:
        """The victim's code: the two's complement minimum (-8 / -128)."""
        return -(2 ** (self.bits - 1))

    @property
    def bias(self) -> int:
        return self.bits - 1

    @property
    def emax(self) -> int:
        return 2**self.ebits - 1

    @property
    def min_outlier(self) -> float:
        return 2.0**self.bias * (1 + 2.0**-self.mbits)

    @property
    def max_outlier(self) -> float:
        return 2.0 ** (self.emax + self.bias) * (2 - 2.0**-self.mbits)

    @property
    def threshold(self) -> float:
        """``|y|`` above this is an outlier: the midpoint between ``qmax`` and ``min_outlier``."""
        return (self.qmax + self.min_outlier) / 2


OLIVE_GRIDS = {4: OliveGrid(4, 2, 1), 8: OliveGrid(8, 4, 3)}


def olive_grid(bits: int) -> OliveGrid:
    if bits not in OLIVE_GRIDS:
        raise LowbitError(f"Olive encodes 4- or 8-bit values (int4 / int8), not {bits}-bit")
    return OLIVE_GRIDS[bits]


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` for integer ``k`` in [-126, 127], float32, built from its bit pattern (exact, and
    much faster than ``torch.ldexp``, which computes a power)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def abfloat_round(mag: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """Magnitudes ``mag`` (float32, >= 0) rounded to abfloat magnitudes (ties to even mantissa),
    clamped to ``[min_outlier, max_outlier]``; float32, exact."""
    _, e = torch.frexp(mag)  # mag = f * 2**e, f in [0.5, 1): the binade is e - 1
    binade = (e - 1).clamp(grid.bias, grid.emax + grid.bias)
    step = _pow2(binade - grid.mbits)
    q = torch.round(mag * _pow2(grid.mbits - binade)) * step  # exact: powers of two
    return q.clamp(grid.min_outlier, grid.max_outlier)


def abfloat_codes(q: torch.Tensor, negative: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """Abfloat magnitudes ``q`` (on the grid) and signs -> codes as ``bits``-bit two's complement int16."""
    _, e = torch.frexp(q)
    exp = (e - 1 - grid.bias).to(torch.int16)
    man = (q * _pow2(1 - e) - 1) * 2**grid.mbits  # (q / 2**binade - 1) * 2**M, exact
    pattern = (exp << grid.mbits) | man.to(torch.int16)
    pattern = pattern | (negative.to(torch.int16) << (grid.ebits + grid.mbits))
    return torch.where(pattern >= 2 ** (grid.bits - 1), pattern - 2**grid.bits, pattern)


def abfloat_values(codes: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """``bits``-bit two's complement codes read as abfloat bit patterns -> float32 values."""
    pattern = codes.to(torch.int32) & (2**grid.bits - 1)
    sign = (pattern >> (grid.ebits + grid.mbits)) & 1
    exp = (pattern >> grid.mbits) & (2**grid.ebits - 1)
    man = pattern & (2**grid.mbits - 1)
    mag = (1 + man.to(torch.float32) / 2**grid.mbits) * _pow2(exp + grid.bias)
    return torch.where(sign == 1, -mag, mag)


def _pairs(y: torch.Tensor) -> torch.Tensor:
    if y.shape[-1] % 2:
        raise LowbitError(
            f"Olive pairs adjacent values along the last dimension, which has odd size {y.shape[-1]}; "
            "use a plain integer scheme for this layer"
        )
    return y.reshape(*y.shape[:-1], y.shape[-1] // 2, 2)


def olive_encode(y: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """Values in units of the scale ``y`` (..., N), N even -> int8 codes (..., N) (see the module doc)."""
    p = _pairs(y.to(torch.float32))
    mag = p.abs()
    normal = torch.round(p).clamp(-grid.qmax, grid.qmax).to(torch.int16)
    outlier = mag > grid.threshold
    # the outlier each pair keeps: slot 1 only if it is an outlier larger than slot 0's magnitude
    # (or slot 0 is no outlier); ties keep slot 0
    keep1 = outlier[..., 1] & (~outlier[..., 0] | (mag[..., 1] > mag[..., 0]))
    keep0 = outlier[..., 0] & ~keep1
    slot = keep1.to(torch.int64).unsqueeze(-1)
    kept = torch.gather(p, -1, slot).squeeze(-1)
    code = abfloat_codes(abfloat_round(kept.abs(), grid), kept < 0, grid)
    ident = torch.full_like(code, grid.identifier)
    c0 = torch.where(keep0, code, torch.where(keep1, ident, normal[..., 0]))
    c1 = torch.where(keep1, code, torch.where(keep0, ident, normal[..., 1]))
    return torch.stack([c0, c1], -1).reshape(y.shape).to(torch.int8)


def olive_decode(codes: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """int8 codes (..., N) -> float32 values in units of the scale: the identifier's slot is 0 and
    its neighbour is read as abfloat; other codes are the integers themselves."""
    c = _pairs(codes.to(torch.int16))
    victim0 = c[..., 0] == grid.identifier
    victim1 = (c[..., 1] == grid.identifier) & ~victim0
    ab = abfloat_values(c, grid)
    plain = c.to(torch.float32)
    v0 = torch.where(victim0, 0.0, torch.where(victim1, ab[..., 0], plain[..., 0]))
    v1 = torch.where(victim1, 0.0, torch.where(victim0, ab[..., 1], plain[..., 1]))
    return torch.stack([v0, v1], -1).reshape(codes.shape)


def olive_values(y: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """``olive_decode(olive_encode(y))`` computed on values alone (no codes), bit for bit the same:
    what the scale search evaluates for every candidate."""
    p = _pairs(y.to(torch.float32))
    mag = p.abs()
    outlier = mag > grid.threshold
    keep1 = outlier[..., 1] & (~outlier[..., 0] | (mag[..., 1] > mag[..., 0]))
    keep0 = outlier[..., 0] & ~keep1
    kept = torch.stack([keep0, keep1], -1)
    victim = torch.stack([keep1, keep0], -1)
    out = torch.where(kept, torch.copysign(abfloat_round(mag, grid), p), torch.round(p).clamp_(-grid.qmax, grid.qmax))
    return out.masked_fill_(victim, 0.0).reshape(y.shape)


def olive_fake_quantize(x: torch.Tensor, scale: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """``decode(encode(x / scale)) * scale`` (float32, ``scale`` broadcasting over ``x`` (..., N)),
    computed by ``olive_values`` (the same values, without building codes: 3x faster)."""
    return olive_values(x.to(torch.float32) / scale, grid) * scale


def pair_stats(y: torch.Tensor, codes: torch.Tensor, grid: OliveGrid) -> tuple[int, int, int]:
    """(pairs, pairs that hold an outlier, victims zeroed) of values ``y`` (..., N) in units of the
    scale and their codes: each outlier pair has one victim; it is *zeroed* (information lost) when
    it would not have rounded to 0 on the normal grid."""
    c = _pairs(codes)
    victim = c == grid.identifier
    lost = victim & (torch.round(_pairs(y.to(torch.float32))) != 0)
    return c.numel() // 2, int(victim.any(-1).sum()), int(lost.sum())


# searched values per tensor (weights, activations): see ``olive_scale``'s ``max_values``
OLIVE_WEIGHT_SAMPLE = 1 << 16
OLIVE_ACT_SAMPLE = 1 << 13
# 0.75 .. 2.45 of the 3-sigma range: the reference's 0.75 .. 2.5, in steps of 0.1 instead of 0.02
# (the error curve is smooth at that scale, and activations search on every call)
SEARCH_RATIOS = tuple(0.75 + 0.1 * i for i in range(18))


def olive_scale(
    x: torch.Tensor, grid: OliveGrid, ratios: tuple[float, ...] = SEARCH_RATIOS, max_values: int | None = None
) -> torch.Tensor:
    """Per row of ``x`` (R, N) the scale (R,) float32 of least Olive quantization error.

    Candidates ``alpha = r * max(|mean + 3 std|, |mean - 3 std|)`` for each ``r`` in ``ratios``,
    ``scale = alpha / qmax``; the first candidate of least squared error wins. A row of zeros gets
    scale 1. ``max_values`` (optional) searches on a sample of whole pairs of each row, at most that
    many values, drawn with a fixed seed (the per-tensor search over millions of values costs
    seconds a layer on a CPU, and that many values estimate the error curve within noise); the
    scale then applies to all of ``x``.
    """
    xf = x.detach().to(torch.float32)
    sample = xf
    if max_values is not None and xf.shape[1] > max_values:
        # whole pairs drawn with a fixed seed (the same on every call and machine): a stride could
        # alias with the row length of the tensor the rows were flattened from and miss channels
        pairs = _pairs(xf)  # (R, N/2, 2)
        pick = torch.randint(0, pairs.shape[1], (max_values // 2,), generator=torch.Generator().manual_seed(0))
        sample = pairs[:, pick.to(xf.device)].reshape(xf.shape[0], -1)
    mean, std = sample.mean(1), sample.std(1) if sample.shape[1] > 1 else torch.zeros_like(sample[:, 0])
    base = torch.maximum((mean + 3 * std).abs(), (mean - 3 * std).abs())  # (R,)
    ratio = torch.tensor(ratios, dtype=torch.float32, device=xf.device)
    cand = (base[:, None] * ratio / grid.qmax).clamp(min=torch.finfo(torch.float32).tiny)  # (R, C)
    err = torch.empty_like(cand)
    # candidates in chunks of about 2**22 values: one batched evaluation instead of one per candidate
    chunk = max(1, (1 << 22) // max(sample.numel(), 1))
    for i in range(0, len(ratios), chunk):
        s = cand[:, i : i + chunk, None]  # (R, c, 1)
        diff = olive_values(sample[:, None, :] / s, grid).mul_(s).sub_(sample[:, None, :])
        err[:, i : i + chunk] = diff.mul_(diff).sum(-1)
    best = err.argmin(1)  # the first of least error
    scale = cand.gather(1, best[:, None]).squeeze(1)
    return torch.where(base > 0, scale, torch.ones_like(scale))


def olive_dynamic_fake_quantize(x: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """Dynamic per-tensor Olive fake quantization of an activation ``x`` (..., H), H even: the scale
    is searched on this call's values (on at most ``OLIVE_ACT_SAMPLE`` of
    them); float32 of ``x``'s shape."""
    xf = x.to(torch.float32)
    if xf.numel() == 0:
        return xf
    return olive_fake_quantize(xf, olive_dynamic_scale(xf, grid), grid)


def olive_dynamic_scale(x: torch.Tensor, grid: OliveGrid) -> torch.Tensor:
    """The scale (0-d float32) ``olive_dynamic_fake_quantize`` uses for ``x``."""
    return olive_scale(x.reshape(1, -1), grid, max_values=OLIVE_ACT_SAMPLE).reshape(())
