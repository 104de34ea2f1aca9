"""llama.cpp's block types: byte layouts, the values they decode to, and fitting them to floats.

A weight (rows, cols) is cut along each row into blocks of ``size`` values (32, or 256 for the
K-quants); each block is stored as ``type_size`` bytes. The fields of a block are kept unpacked
(integer codes and float16 scales) so that lowbit's own codes can be carried over unchanged:

- ``Q8_0``, ``Q5_0``, ``Q4_0``: ``d * k`` with ``k`` in [-128, 127], [-16, 15], [-8, 7];
- ``Q5_1``, ``Q4_1``: ``d * u + m`` with ``u`` in [0, 31], [0, 15];
- ``Q4_K``: 8 sub-blocks of 32, ``d * sc * u - dmin * mn`` with 6-bit ``sc``/``mn``, ``u`` in [0, 15];
- ``Q6_K``: 16 sub-blocks of 16, ``d * sc * k`` with int8 ``sc``, ``k`` in [-32, 31].

``d``, ``m``, ``dmin`` are float16. ``decode`` computes the values as ``gguf.quants`` and
llama.cpp do (float32, same order of operations), so an error measured on it is the file's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType
from numpy.typing import ArrayLike

Fields = dict[str, np.ndarray]


@dataclass(frozen=True)
class BlockType:
    name: str
    ggml: GGMLQuantizationType
    file_type: LlamaFileType
    size: int  # weights per block
    bits: int  # bits of a code
    affine: bool = False  # d * u + m (unsigned codes) rather than d * k (signed codes)
    kquant: bool = False  # 256-weight super-blocks with quantized sub-block scales

    @property
    def kmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def kmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def umax(self) -> int:
        return 2**self.bits - 1


_Q = GGMLQuantizationType
_F = LlamaFileType
BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q8_0", _Q.Q8_0, _F.MOSTLY_Q8_0, 32, 8),
        BlockType("Q5_0", _Q.Q5_0, _F.MOSTLY_Q5_0, 32, 5),
        BlockType("Q5_1", _Q.Q5_1, _F.MOSTLY_Q5_1, 32, 5, affine=True),
        BlockType("Q4_0", _Q.Q4_0, _F.MOSTLY_Q4_0, 32, 4),
        BlockType("Q4_1", _Q.Q4_1, _F.MOSTLY_Q4_1, 32, 4, affine=True),
        BlockType("Q4_K", _Q.Q4_K, _F.MOSTLY_Q4_K_S, 256, 4, affine=True, kquant=True),
        BlockType("Q6_K", _Q.Q6_K, _F.MOSTLY_Q6_K, 256, 6, kquant=True),
    )
}


def f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def _bytes(x: np.ndarray) -> np.ndarray:
    """(n, ...) array -> (n, nbytes) uint8 view."""
    return np.ascontiguousarray(x).view(np.uint8).reshape(x.shape[0], -1)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


# ---- packing: fields -> bytes (n_blocks, type_size) ---------------------------------------------


def pack(t: BlockType, f: Fields) -> np.ndarray:
    """The blocks' bytes in llama.cpp's layout."""
    if t.kquant:
        return _pack_q4_k(f) if t.name == "Q4_K" else _pack_q6_k(f)
    n = f["d"].shape[0]
    if t.name == "Q8_0":
        return np.concatenate([_bytes(f["d"][:, None]), _bytes(f["k"].astype(np.int8))], axis=1)
    u = (f["u"] if t.affine else f["k"] - t.kmin).astype(np.uint8)  # stored unsigned
    parts = [_bytes(f["d"][:, None])]
    if t.affine:
        parts.append(_bytes(f["m"][:, None]))
    if t.bits == 5:  # the fifth bits, bit j of a little-endian uint32 for weight j
        parts.append(np.packbits((u >> 4) & 1, axis=1, bitorder="little").reshape(n, 4))
    parts.append(_nibbles(u[:, :16], u[:, 16:]))  # weight j in the low nibble, j + 16 in the high one
    return np.concatenate(parts, axis=1)


def _pack_q4_k(f: Fields) -> np.ndarray:
    n = f["d"].shape[0]
    sc, mn = f["sc"].astype(np.uint8), f["mn"].astype(np.uint8)  # (n, 8), 6 bits each
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),  # sub-blocks 0-3 whole, top bits of 4-7's scales
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),  # low bits of 4-7
        ],
        axis=1,
    )
    u = f["u"].astype(np.uint8).reshape(n, 4, 2, 32)  # 4 chunks of 64: 32 low nibbles, 32 high ones
    qs = _nibbles(u[:, :, 0], u[:, :, 1]).reshape(n, 128)
    return np.concatenate([_bytes(f["d"][:, None]), _bytes(f["dmin"][:, None]), scales, qs], axis=1)


def _pack_q6_k(f: Fields) -> np.ndarray:
    n = f["d"].shape[0]
    u = (f["k"] + 32).astype(np.uint8)  # (n, 256) in [0, 63]
    lo = u.reshape(n, 2, 2, 64)  # halves of 128: weights 0-63 in low nibbles, 64-127 in high ones
    ql = _nibbles(lo[:, :, 0], lo[:, :, 1]).reshape(n, 128)
    hi = (u.reshape(n, 2, 4, 32) >> 4) & 0x03  # two high bits of 4 runs of 32 share a byte
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, f["sc"].astype(np.int8).view(np.uint8), _bytes(f["d"][:, None])], axis=1)


# ---- decoding: fields -> float32 values (n_blocks, size) ------------------------------------------


def decode(t: BlockType, f: Fields) -> np.ndarray:
    d = f["d"].astype(np.float32)[:, None]
    if t.name == "Q4_K":
        n = d.shape[0]
        ds = (d * f["sc"].astype(np.float32))[:, :, None]
        dm = (f["dmin"].astype(np.float32)[:, None] * f["mn"].astype(np.float32))[:, :, None]
        return (ds * f["u"].reshape(n, 8, 32).astype(np.float32) - dm).reshape(n, 256)
    if t.name == "Q6_K":
        n = d.shape[0]
        ds = (d * f["sc"].astype(np.float32))[:, :, None]
        return (ds * f["k"].reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)
    if t.affine:
        return d * f["u"].astype(np.float32) + f["m"].astype(np.float32)[:, None]
    return d * f["k"].astype(np.float32)


# ---- fitting: float32 blocks (n_blocks, size) -> fields --------------------------------------------


def _div(x: ArrayLike, d: ArrayLike) -> np.ndarray:
    """x / d, 0 where d is 0."""
    d = np.asarray(d)
    safe = np.where(d == 0, 1, d)
    return np.where(d == 0, 0, np.asarray(x) / safe)


def fit(t: BlockType, x: np.ndarray, step: np.ndarray | None = None) -> Fields:
    """Quantize float blocks into ``t``: round to nearest, as llama.cpp's reference quantizers, and a
    scale/min search for the K-quants.

    ``step`` (optional, like ``x``): the spacing of a grid ``x`` already lies on (lowbit's scale of
    each weight; NaN where unknown). The K-quants try it as one more candidate for each sub-block
    on which it is constant: with it, a sub-block is kept exactly until its scale is rounded to
    the type's 6/8-bit sub-block scales.
    """
    x = np.asarray(x, dtype=np.float32)
    if t.name == "Q4_K":
        return _fit_q4_k(x, _sub_steps(step, x.shape[0] * 8, 32))
    if t.name == "Q6_K":
        return _fit_q6_k(x, _sub_steps(step, x.shape[0] * 16, 16))
    if t.affine:
        lo, hi = x.min(axis=1), x.max(axis=1)
        d, m = f16((hi - lo) / t.umax), f16(lo)
        u = np.clip(np.rint(_div(x - m.astype(np.float32)[:, None], d.astype(np.float32)[:, None])), 0, t.umax)
        return {"u": u.astype(np.uint8), "d": d, "m": m}
    if t.name == "Q8_0":
        d = f16(np.abs(x).max(axis=1) / t.kmax)
    else:  # the largest magnitude lands on the grid's end -2**(b-1), as llama.cpp's Q4_0/Q5_0 do
        big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
        d = f16(big / t.kmin)
    k = np.clip(np.rint(_div(x, d.astype(np.float32)[:, None])), t.kmin, t.kmax)
    return {"k": k.astype(np.int16), "d": d}


def _sub_steps(step: np.ndarray | None, m: int, n: int) -> np.ndarray:
    """The grid step of each of the ``m`` sub-blocks of ``n`` weights (NaN where it varies or is unknown)."""
    if step is None:
        return np.full(m, np.nan, dtype=np.float32)
    s = np.asarray(step, dtype=np.float32).reshape(m, n)
    return np.where((s == s[:, :1]).all(axis=1) & (s[:, 0] > 0), s[:, 0], np.nan).astype(np.float32)


def _least_squares(q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, (a, c) minimizing |a*q + c - x|^2 with c <= 0 (c = 0 and a fitted alone otherwise)."""
    n = q.shape[1]
    sq, sqq, sx, sqx = q.sum(1), (q * q).sum(1), x.sum(1), (q * x).sum(1)
    det = n * sqq - sq * sq
    a = _div(n * sqx - sq * sx, det)
    c = _div(sqq * sx - sq * sqx, det)
    alone = (c > 0) | (det == 0)
    return np.where(alone, _div(sqx, sqq), a), np.where(alone, 0.0, c)


def _fit_scale_min(x: np.ndarray, nmax: int, grid: np.ndarray, steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Sub-blocks (m, n) -> scale a >= 0 and min b >= 0 with x ~ a*q - b, q in [0, nmax]: the lowest
    squared error over candidate grids stretched from 0.9x to 1.1x of the range (llama.cpp's
    make_qkx2_quants search, unweighted), and the known grid step ``grid`` (m,) (NaN: none) with
    its lowest point at or below 0."""
    lo = np.minimum(x.min(axis=1), 0.0)
    span = x.max(axis=1) - lo
    best_err = np.full(x.shape[0], np.inf, dtype=np.float32)
    best_a, best_c = _div(span, np.float32(nmax)), lo  # the plain min/max grid
    known = ~np.isnan(grid)
    g = np.where(known, grid, 1.0)
    g_lo = g * np.minimum(np.rint(x.min(axis=1) / g), 0.0)
    for step in range(-2, steps + 1):
        iscale = _div(np.float32(nmax + (step * 0.1 - 1.0 if step >= 0 else 0.0)), span)
        if step == -2:
            a, c = g, g_lo
            q = np.clip(np.rint((x - c[:, None]) / a[:, None]), 0, nmax)
        else:
            q = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            a, c = (_div(np.float32(1.0), iscale), lo) if step < 0 else _least_squares(q, x)
        err = ((a[:, None] * q + c[:, None] - x) ** 2).sum(axis=1)
        better = (err < best_err) & (a >= 0) & (known if step == -2 else True)
        best_err = np.where(better, err, best_err)
        best_a, best_c = np.where(better, a, best_a), np.where(better, c, best_c)
    return best_a.astype(np.float32), (-best_c).astype(np.float32)


def _sub_scales(a: np.ndarray, lo: int, hi: int, tries: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales (n, k) -> float16 d (n,) and integers sc in [lo, hi] with d*sc ~ a: of the d
    that put the largest |a| on an integer e (from the range's end inwards), the one with the least
    squared error, so that sub-blocks sharing a grid (a lowbit group of 128 in a super-block of 256)
    stay on it."""
    if lo < 0:  # signed: the largest magnitude goes to lo, e.g. -128
        ref, edge, inward = np.take_along_axis(a, np.abs(a).argmax(axis=1)[:, None], axis=1)[:, 0], lo, 1
    else:
        ref, edge, inward = a.max(axis=1), hi, -1
    best_err = np.full(a.shape[0], np.inf, dtype=np.float32)
    best_d = np.zeros(a.shape[0], dtype=np.float16)
    for i in range(tries):
        d = f16(ref / (edge + inward * i))
        d32 = d.astype(np.float32)[:, None]
        err = ((d32 * np.clip(np.rint(_div(a, d32)), lo, hi) - a) ** 2).sum(axis=1)
        better = err < best_err
        best_err, best_d = np.where(better, err, best_err), np.where(better, d, best_d)
    sc = np.clip(np.rint(_div(a, best_d.astype(np.float32)[:, None])), lo, hi)
    return best_d, sc


def _fit_q4_k(x: np.ndarray, grid: np.ndarray) -> Fields:
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    a, b = (v.reshape(n, 8) for v in _fit_scale_min(sub, 15, grid))
    (d, sc), (dmin, mn) = _sub_scales(a, 0, 63), _sub_scales(b, 0, 63)
    # the codes again, for the sub-block scale and min as stored
    ds = (d.astype(np.float32)[:, None] * sc).reshape(n * 8, 1)
    dm = (dmin.astype(np.float32)[:, None] * mn).reshape(n * 8, 1)
    u = np.clip(np.rint(_div(sub + dm, ds)), 0, 15).astype(np.uint8).reshape(n, 256)
    return {"u": u, "d": d, "dmin": dmin, "sc": sc.astype(np.uint8), "mn": mn.astype(np.uint8)}


def _fit_signed_scale(x: np.ndarray, nmax: int, grid: np.ndarray, steps: int = 9) -> np.ndarray:
    """Sub-blocks (m, n) -> scale s with x ~ s*k, k in [-nmax, nmax - 1]: the least-squares scale of
    the best of the grids that put the largest magnitude at -(nmax + 0.1*i), |i| <= steps
    (llama.cpp's make_qx_quants search, unweighted), or the known grid step ``grid`` (m,) (NaN: none)."""
    big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]
    best_err = np.full(x.shape[0], np.inf, dtype=np.float32)
    best = np.zeros(x.shape[0], dtype=np.float32)
    for step in range(-steps - 1, steps + 1):
        if step < -steps:  # the known grid
            s = np.where(np.isnan(grid), 0.0, grid)
            k = np.clip(np.rint(_div(x, s[:, None])), -nmax, nmax - 1)
            err = np.where(np.isnan(grid), np.inf, ((s[:, None] * k - x) ** 2).sum(axis=1))
        else:
            k = np.clip(np.rint(_div(np.float32(-(nmax + 0.1 * step)), big)[:, None] * x), -nmax, nmax - 1)
            slx, sll = (k * x).sum(axis=1), (k * k).sum(axis=1)
            s = _div(slx, sll)
            err = np.where(sll > 0, ((s[:, None] * k - x) ** 2).sum(axis=1), np.inf)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, s, best)
    return best


def _fit_q6_k(x: np.ndarray, grid: np.ndarray) -> Fields:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    s = _fit_signed_scale(sub, 32, grid).reshape(n, 16)
    d, sc = _sub_scales(s, -128, 127)
    ds = (d.astype(np.float32)[:, None] * sc).reshape(n * 16, 1)
    k = np.clip(np.rint(_div(sub, ds)), -32, 31).astype(np.int16).reshape(n, 256)
    return {"k": k, "d": d, "sc": sc.astype(np.int8)}


def encode_rows(t: BlockType, w: np.ndarray, step: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit a weight (rows, cols) into ``t`` (``step``: see :func:`fit`): (bytes (rows, cols/size*type_size),
    decoded values)."""
    rows, cols = w.shape
    f = fit(t, w.reshape(-1, t.size), None if step is None else step.reshape(-1, t.size))
    return pack(t, f).reshape(rows, -1), decode(t, f).reshape(rows, cols)
