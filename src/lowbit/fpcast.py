"""ZeroQuant-FP's cast of FP4 weights to FP8 by exponent arithmetic alone (Wu et al., 2023).

A weight stored as an FP4 E2M1 code ``c`` with a power-of-two scale ``2**k`` has the real value
``fp4(c) * 2**k``. FP8 E4M3 (the OCP ``fn`` variant: bias 7, subnormals, max 448) can hold that
value exactly whenever its exponent fits, so an FP8 tensor core can multiply the weight by FP8
activations without dequantizing and requantizing: the cast only moves the exponent by ``k`` and
widens the mantissa from 1 to 3 bits. ``fp4_to_fp8`` does it on bit patterns with integer
operations (no float arithmetic) and raises where ``2**k`` pushes a value out of FP8's range
(above 448, or below its smallest subnormal step without being exact).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

FP8_BIAS = 7  # E4M3
FP8_MAX_EXP = 8  # largest unbiased exponent of E4M3fn (exponent field 15; 1.75 * 2**8 = 448)


def fp4_to_fp8(codes: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 bit patterns ``codes`` (uint8, low 4 bits) and integer scale exponents ``exponent``
    (broadcasting) -> FP8 E4M3 bit patterns (uint8) of exactly ``fp4(codes) * 2**exponent``.

    FP4 E2M1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent field 0 is the
    subnormal ``0.5 * m``. Every non-zero FP4 value is written ``1.mmm * 2**E`` (3-bit FP8
    mantissa, unbiased exponent), ``E`` moves by ``exponent``, and the result is packed as an FP8
    normal (biased exponent 1..15) or, below, as a subnormal when no mantissa bit is shifted out.
    Raises ``LowbitError`` naming the first code and exponent that do not fit.
    """
    c = codes.to(torch.int32) & 0xF
    k = exponent.to(torch.int32)
    c, k = torch.broadcast_tensors(c, k)
    sign = (c >> 3) & 1
    e4 = (c >> 1) & 3
    m4 = c & 1
    zero = (e4 == 0) & (m4 == 0)
    # every non-zero FP4 value as 1.mmm * 2**E: normals (e4 > 0) have E = e4 - 1 and mantissa m4 << 2;
    # the one subnormal (e4 = 0, m4 = 1) is 0.5 = 1.000 * 2**-1
    unbiased = torch.where(e4 > 0, e4 - 1, torch.full_like(e4, -1)) + k
    mant = torch.where(e4 > 0, m4 << 2, torch.zeros_like(m4))  # 3-bit FP8 mantissa
    field = unbiased + FP8_BIAS
    # a subnormal FP8 value is (mmm / 8) * 2**-6: shift the implicit one in and right by 1 - field
    shift = (1 - field).clamp(min=0)
    full = (8 | mant) >> shift.clamp(max=4)  # 1.mmm in eighths, shifted into the subnormal range
    exact = ((full << shift.clamp(max=4)) == (8 | mant)) & (shift <= 3)
    overflow = ~zero & (field > FP8_BIAS + FP8_MAX_EXP)
    underflow = ~zero & (field < 1) & ~exact
    bad = overflow | underflow
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten())[0])
        code, exp = int(c.flatten()[i]), int(k.flatten()[i])
        where = "above FP8 E4M3's largest value 448" if bool(overflow.flatten()[i]) else "below FP8 E4M3's finest step"
        raise LowbitError(
            f"FP4 code {code:#06b} times 2**{exp} is {where}: the scale exponent leaves FP8's range, so this "
            "weight cannot be cast to FP8 exactly"
        )
    normal_bits = (field.clamp(1, 15) << 3) | mant
    sub_bits = full & 7
    bits = torch.where(field >= 1, normal_bits, sub_bits)
    bits = torch.where(zero, torch.zeros_like(bits), bits) | (sign << 7)
    return bits.to(torch.uint8)


def pow2_exponents(scale: torch.Tensor) -> torch.Tensor:
    """Integer exponents ``k`` (int32) of power-of-two scales ``2**k``; raises if one is not a power of two."""
    mant, e = torch.frexp(scale.to(torch.float32))
    if not bool((mant == 0.5).all()):
        raise LowbitError(
            "the FP4 -> FP8 cast needs power-of-two weight scales: quantize with scale_dtype 'pow2' (preset w4a8-fp)"
        )
    return (e - 1).to(torch.int32)


def fp8_weight(codes: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """An FP4 E2M1 weight (codes (out, in) uint8, power-of-two scales (out, G), ``g_idx`` (in,))
    cast to FP8 E4M3 bit patterns (out, in) uint8 holding exactly ``fp4(codes) * scale[:, g_idx]``."""
    return fp4_to_fp8(codes, pow2_exponents(scale)[:, g_idx.to(torch.int64)])
