"""Plain reference implementations for the quantization tests (no lowbit code is used here).

Everything is scalar Python: integers, exact fractions, and ``numpy.float32`` arithmetic where the
code under test is specified to compute in float32 (one IEEE float32 operation at a time, so the
reference rounds exactly where the specification says it does).
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import numpy as np

F32 = np.float32

# --- integer grids ---------------------------------------------------------------------------------

INT_NAMES = [f"{p}{b}" for p in ("int", "uint") for b in range(2, 9)]


def int_range(name: str) -> tuple[int, int]:
    """(qmin, qmax) of ``intB`` (two's complement) or ``uintB``."""
    if name.startswith("uint"):
        return 0, 2 ** int(name[4:]) - 1
    bits = int(name[3:])
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_half_even(v: float) -> int:
    """Nearest integer to a finite float, ties to the even integer."""
    fl = math.floor(v)
    frac = Fraction(v) - fl
    if frac > Fraction(1, 2):
        return fl + 1
    if frac < Fraction(1, 2):
        return fl
    return fl if fl % 2 == 0 else fl + 1


def int_round(v: float, qmin: int, qmax: int) -> int:
    """Round half to even, then saturate to [qmin, qmax] (handles +-inf)."""
    if v <= qmin:
        return qmin
    if v >= qmax:
        return qmax
    return min(max(round_half_even(v), qmin), qmax)


# --- OCP ExMy float grids --------------------------------------------------------------------------

# name -> (exponent bits, mantissa bits, "is this (exponent field, mantissa field) not a finite number")
FLOAT_SPECS = {
    # E4M3 "fn": only S.1111.111 is NaN, no infinities
    "fp8_e4m3": (4, 3, lambda e, m: e == 15 and m == 7),
    # E5M2: IEEE-like, exponent field all ones is inf / NaN
    "fp8_e5m2": (5, 2, lambda e, m: e == 31),
    # FP6 / FP4 (OCP MX): every encoding is a finite number
    "fp6_e3m2": (3, 2, lambda e, m: False),
    "fp6_e2m3": (2, 3, lambda e, m: False),
    "fp4_e2m1": (2, 1, lambda e, m: False),
}
FLOAT_NAMES = list(FLOAT_SPECS)
FLOAT_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp6_e3m2": 28.0, "fp6_e2m3": 7.5, "fp4_e2m1": 6.0}


def decode_float(name: str, code: int) -> float | None:
    """Value of a bit pattern ``sign | exponent | mantissa``; None for inf/NaN encodings."""
    ebits, mbits, reserved = FLOAT_SPECS[name]
    sign = (code >> (ebits + mbits)) & 1
    e = (code >> mbits) & (2**ebits - 1)
    m = code & (2**mbits - 1)
    if reserved(e, m):
        return None
    bias = 2 ** (ebits - 1) - 1
    if e == 0:  # subnormal: 0.m * 2**(1 - bias)
        mag = Fraction(m, 2**mbits) * Fraction(2) ** (1 - bias)
    else:
        mag = (1 + Fraction(m, 2**mbits)) * Fraction(2) ** (e - bias)
    value = float(mag)
    return -value if sign else value


_POS_CACHE: dict[str, tuple[list[float], list[int]]] = {}


def positive_grid(name: str) -> tuple[list[float], list[int]]:
    """Sorted finite non-negative values (0 included once) and their codes (sign bit clear)."""
    if name not in _POS_CACHE:
        ebits, mbits, _ = FLOAT_SPECS[name]
        pairs = []
        for code in range(2 ** (ebits + mbits)):
            v = decode_float(name, code)
            if v is not None:
                pairs.append((v, code))
        pairs.sort()
        _POS_CACHE[name] = ([v for v, _ in pairs], [c for _, c in pairs])
    return _POS_CACHE[name]


def float_grid(name: str) -> list[float]:
    """All finite values, sorted, zero once."""
    vals, _ = positive_grid(name)
    return sorted({-v for v in vals} | set(vals))


def float_round(v: float, name: str) -> float:
    """Nearest grid value; on an exact tie the one whose code is even; beyond the max, the max."""
    vals, codes = positive_grid(name)
    mag = abs(v)
    if mag >= vals[-1]:
        out = vals[-1]
    else:
        i = bisect.bisect_right(vals, mag)  # vals[i-1] <= mag < vals[i]
        lo, hi = vals[i - 1], vals[i]
        d_lo, d_hi = Fraction(mag) - Fraction(lo), Fraction(hi) - Fraction(mag)
        if d_lo < d_hi:
            out = lo
        elif d_hi < d_lo:
            out = hi
        else:
            out = lo if codes[i - 1] % 2 == 0 else hi
    return -out if v < 0 else out


def float_code(q: float, name: str) -> int:
    """Bit pattern of a grid value (0.0 and -0.0 -> code 0)."""
    ebits, mbits, _ = FLOAT_SPECS[name]
    vals, codes = positive_grid(name)
    code = codes[vals.index(abs(q))]
    if q < 0:
        code |= 1 << (ebits + mbits)
    return code


# --- formats as plain data -------------------------------------------------------------------------


def fmt_info(name: str) -> tuple[bool, float, float]:
    """(is_float, qmin, qmax)."""
    if name in FLOAT_SPECS:
        return True, -FLOAT_MAX[name], FLOAT_MAX[name]
    qmin, qmax = int_range(name)
    return False, qmin, qmax


# --- scales, zero points, quantize -----------------------------------------------------------------


def bf16_round(s: np.float32) -> np.float32:
    """float32 -> nearest bfloat16 (ties to even), back to float32, by bit manipulation."""
    u = int(np.array(s, dtype=np.float32).view(np.uint32))
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return F32(np.array(u, dtype=np.uint32).view(np.float32))


def round_scale(s: np.float32, scale_dtype: str) -> np.float32:
    """A float32 scale restricted to ``scale_dtype`` (pow2: the smallest power of two >= s)."""
    s = F32(s)
    if scale_dtype == "float16":
        with np.errstate(over="ignore"):
            r = F32(np.float16(s))
        if math.isinf(r):
            r = F32(65504.0)
    elif scale_dtype == "bfloat16":
        r = bf16_round(s)
        if math.isinf(r):
            r = F32(float.fromhex("0x1.fep127"))
    elif scale_dtype == "pow2":
        if s == 0:
            r = F32(0)
        else:
            m, e = math.frexp(float(s))
            r = F32(float(s) if m == 0.5 else 2.0**e)
    else:
        r = s
    return r if r > 0 else F32(1.0)


def qparams_ref(
    lo: float, hi: float, name: str, symmetric: bool, scale_dtype: str = "float32"
) -> tuple[np.float32, int]:
    """Scale (float32) and integer zero point of one group, spelled out in float32 steps."""
    is_float, qmin, qmax = fmt_info(name)
    lo, hi = F32(lo), F32(hi)
    if symmetric:
        zp = 2 ** (int(name[4:]) - 1) if name.startswith("uint") else 0
        q_pos = qmax if is_float else (qmax - qmin) / 2  # half the integer range: 7.5 for int4
        absmax = max(abs(lo), abs(hi))
        return round_scale(F32(absmax) / F32(q_pos), scale_dtype), zp
    assert not is_float
    lo, hi = min(lo, F32(0)), max(hi, F32(0))
    scale = round_scale(F32(hi - lo) / F32(qmax - qmin), scale_dtype)
    zp = int_round(float(F32(qmin) - lo / scale), int(qmin), int(qmax))
    return scale, zp


def quantize_ref(x: float, scale: np.float32, zp: int, name: str) -> float:
    """Grid value of one number: saturate(round(x / scale) + zp)."""
    is_float, qmin, qmax = fmt_info(name)
    y = float(F32(x) / F32(scale))
    if is_float:
        assert zp == 0
        return float_round(y, name)
    if math.isinf(y):
        return float(qmax if y > 0 else qmin)
    return float(min(max(round_half_even(y) + zp, int(qmin)), int(qmax)))


def dequantize_ref(q: float, scale: np.float32, zp: int) -> float:
    return float(F32(F32(q) - F32(zp)) * F32(scale))
