"""One tensor into one GGUF type: lowbit's codes carried over where the grid matches, else re-quantized.

A quantized linear's integer codes go into a legacy block type unchanged when every block of 32
weights lies in one lowbit group (``g_idx`` constant on it: groups of 32, 64, 128 ..., per
channel or per tensor) and the type's code range holds the grid:

- ``Q8_0``/``Q5_0``/``Q4_0`` store ``d * k``: ``k = q - zero_point`` must fit [-128, 127],
  [-16, 15], [-8, 7] (symmetric int8/int5/int4 and narrower; asymmetric grids need twice the range);
- ``Q5_1``/``Q4_1`` store ``d * u + m``: ``u = q - qmin`` (at most 32 / 16 levels) and
  ``m = -scale * (zero_point - qmin)``, which is rounded to float16 (exact when it fits).

``d`` is lowbit's scale as float16 (exact for float16 scales). Every other case (float grids,
groups that straddle blocks, act-order ``g_idx``, the K-quants' quantized sub-block scales) is
re-quantized from lowbit's dequantized weight with this package's encoders. For the K-quants the
encoder tries lowbit's grid step in each sub-block, so groups that line up with the sub-blocks
(32 weights for Q4_K, 16 for Q6_K) change only by the rounding of the sub-block scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.export.gguf_blocks import BLOCK_TYPES, BlockType, decode, encode_rows, f16, pack
from lowbit.formats import IntFormat
from lowbit.primitives import symmetric_zero_point
from lowbit.qweight import QuantizedWeight

FLOAT_TYPES = {"f32": np.float32, "f16": np.float16}
TYPE_NAMES = ("f32", "f16", *BLOCK_TYPES)
# the types that can hold a grid exactly, smallest first (bits per weight: 4.5, 5, 5.5, 6, 8.5)
EXACT_ORDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass
class Encoded:
    data: np.ndarray  # float rows, or block bytes (rows, nbytes) when raw_type is set
    raw_type: GGMLQuantizationType | None
    values: np.ndarray  # float32 (rows, cols): what the file decodes to
    carried: bool = False  # lowbit's codes written unchanged
    rounded: int = 0  # carried blocks whose float16 d (or m) differs from lowbit's exact value
    blocks: int = 0
    reason: str = ""  # why it was re-quantized

    def permute_rows(self, order: np.ndarray) -> None:
        self.data, self.values = self.data[order], self.values[order]


def carry_reason(qw: QuantizedWeight, t: BlockType) -> str | None:
    """None when ``qw``'s codes go into ``t`` unchanged; else the property that differs."""
    spec, fmt = qw.spec, qw.spec.fmt
    if t.kquant:
        return f"{t.name} stores per-sub-block scales as 6/8-bit multiples of one float16 scale per 256 weights"
    if not isinstance(fmt, IntFormat):
        return f"{fmt.name} is a float grid; {t.name} holds integer codes"
    if qw.n_outlier_columns:
        return "it keeps float columns (OWQ)"
    if qw.shape[1] % t.size:
        return f"in_features {qw.shape[1]} is not a multiple of {t.name}'s block of {t.size}"
    blocks = qw.g_idx.reshape(-1, t.size)
    if not bool((blocks == blocks[:, :1]).all()):
        groups = f"groups of {spec.group_size}" if spec.granularity == "group" else f"{spec.granularity} groups"
        if spec.granularity == "group" and (spec.group_size or 1) % t.size == 0:
            groups += " reordered by g_idx (act-order)"
        return f"its {groups} do not line up with {t.name}'s blocks of {t.size} weights"
    if t.affine:
        if fmt.qmax - fmt.qmin > t.umax:
            return f"{fmt.name} has {fmt.qmax - fmt.qmin + 1} levels; {t.name} has {t.umax + 1}"
        return None
    zp_lo, zp_hi = (symmetric_zero_point(fmt),) * 2 if spec.symmetric else (fmt.qmin, fmt.qmax)
    lo, hi = fmt.qmin - zp_hi, fmt.qmax - zp_lo
    if lo < t.kmin or hi > t.kmax:
        return f"{spec.describe()} needs q - zero_point in [{lo}, {hi}]; {t.name} holds [{t.kmin}, {t.kmax}]"
    return None


def carry(qw: QuantizedWeight, t: BlockType) -> Encoded:
    """``qw``'s codes in ``t``'s blocks (``carry_reason`` must be None)."""
    fmt = qw.spec.fmt
    assert isinstance(fmt, IntFormat)
    rows, cols = qw.shape
    nb = cols // t.size
    first = qw.g_idx[:: t.size]  # the group of each block
    q = qw.grid_values().numpy()
    scale = np.broadcast_to(qw.scale.to(torch.float32)[:, first].numpy(), (rows, nb)).reshape(-1)
    zp = np.broadcast_to(qw.zero_point.to(torch.float32)[:, first].numpy(), (rows, nb)).reshape(-1)
    codes = q.reshape(-1, t.size)
    fields = {"d": f16(scale)}
    rounded = fields["d"].astype(np.float32) != scale
    if t.affine:
        m = -scale * (zp - fmt.qmin)  # exact in float32: an 11-bit scale times an integer below 256
        fields |= {"u": (codes - fmt.qmin).astype(np.uint8), "m": f16(m)}
        rounded |= fields["m"].astype(np.float32) != m
    else:
        fields["k"] = (codes - zp[:, None]).astype(np.int16)
    values = decode(t, fields).reshape(rows, cols)
    data = pack(t, fields).reshape(rows, -1)
    return Encoded(data, t.ggml, values, carried=True, rounded=int(rounded.sum()), blocks=rounded.size)


def encode_float(w: torch.Tensor, type_name: str, step: np.ndarray | None = None) -> Encoded:
    """A float tensor (weights, norms, biases) in a float type or re-quantized into a block type
    (``step``: the grid spacing of each weight, when it lies on one: see ``gguf_blocks.fit``)."""
    x = w.detach().to(torch.float32).numpy()
    if type_name in FLOAT_TYPES:
        data = x.astype(FLOAT_TYPES[type_name])
        return Encoded(data, None, data.astype(np.float32))
    t = BLOCK_TYPES[type_name]
    data, values = encode_rows(t, x, step)
    return Encoded(data, t.ggml, values)


def encode_quantized(qw: QuantizedWeight, type_name: str) -> Encoded:
    """A quantized linear's weight in ``type_name``: carried when the grid matches, else re-quantized."""
    if type_name in BLOCK_TYPES:
        reason = carry_reason(qw, BLOCK_TYPES[type_name])
        if reason is None:
            return carry(qw, BLOCK_TYPES[type_name])
    else:
        reason = f"{type_name} is a float type"
    step = None
    if isinstance(qw.spec.fmt, IntFormat) and not qw.n_outlier_columns:
        step = np.broadcast_to(qw.scale.to(torch.float32)[:, qw.g_idx].numpy(), qw.shape)
    enc = encode_float(qw.dequantize(), type_name, step)
    enc.reason = reason
    return enc


def relative_error(values: np.ndarray, ref: np.ndarray) -> float:
    """|values - ref| / |ref| (Frobenius), 0 for two zero tensors."""
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(values.astype(np.float64) - ref))
    return num / den if den > 0 else num
