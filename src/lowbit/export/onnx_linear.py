"""One linear layer as ONNX nodes: float MatMul, ``MatMulNBits``, or QDQ (Quantize/DequantizeLinear).

Weights:

- float (``nn.Linear``, or a QuantLinear with activation-only quantization): ``MatMul`` with the
  fp32 weight;
- integer weights of 2 to 8 bits, any granularity, with or without act-order ``g_idx``:
  ``com.microsoft.MatMulNBits`` with 2, 4 or 8 bits holding lowbit's codes exactly. Signed codes
  ``q`` are stored as ``q + 2**(bits-1)`` (MatMulNBits reads unsigned codes) and zero points
  shift alike; 3-bit codes go in 4-bit slots, 5 to 7-bit codes in 8-bit slots. MatMulNBits
  blocks are a power of two >= 16 along the input; a group becomes one or more blocks with the
  same scale (per-channel weights: blocks of 128 sharing the channel's scale). Act-order
  ``g_idx`` columns are sorted by group and the input is gathered in the same order, so each
  group is contiguous (exact). OWQ float columns get code = zero point (so they dequantize to 0)
  plus a float ``MatMul`` on the gathered input columns;
- 8-bit per-channel or per-tensor weights of a layer with static quantized inputs:
  ``DequantizeLinear`` of the weight (per-axis scales) into ``MatMul``, the QDQ form onnxruntime
  fuses into integer kernels. The codes are stored as uint8 (int8 ``q`` as ``q + 128``, zero
  point likewise; the same numbers): onnxruntime's fused u8s8 kernel saturates 16-bit
  intermediate sums on CPUs without VNNI (errors of 15% measured with full-range int8 weights),
  its u8u8 kernel is exact. With dynamic inputs the weights go to ``MatMulNBits`` instead: the
  fused kernel onnxruntime would pick rejects per-token zero points.

Input activations (int8/uint8): static per-tensor with lowbit's scale and zero point:
``QuantizeLinear`` -> ``DequantizeLinear``. Dynamic per-token: the range of each token is
computed in the graph with lowbit's formulas (symmetric ``max|x| / 127.5``; asymmetric min/max
widened to 0) and fed as a run-time scale to blocked ``QuantizeLinear``/``DequantizeLinear``
(opset 21, one block = one token's hidden vector). Rounding is half to even in both, so the
graph computes what lowbit's fake quantization computes: on the same input, the same codes
(checked on every layer of SmolLM2-135M W8A8). Inputs that differ in their last bits may round
differently, which deep models amplify (see :meth:`lowbit.export.onnx_runtime.OnnxLM.linear_io`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from lowbit.export.base import Problem
from lowbit.export.onnx_builder import MS_DOMAIN, GraphBuilder
from lowbit.formats import IntFormat
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.packing import pack_bits as stream_pack
from lowbit.primitives import symmetric_zero_point
from lowbit.qweight import QuantizedWeight

NBITS_BLOCKS = (128, 64, 32, 16)  # MatMulNBits block sizes tried, largest first
NBITS_SLOTS = (2, 4, 8)  # bit widths MatMulNBits stores
ACT_TYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}
ACT_NP = {"int8": np.int8, "uint8": np.uint8}
SCALE_MAX = {"float16": 65504.0}  # dynamic scale dtypes the graph can round to (float32 needs nothing)


def nbits_slot(bits: int) -> int:
    return next(b for b in NBITS_SLOTS if b >= bits)


def nbits_block(g_idx: np.ndarray) -> int | None:
    """Largest MatMulNBits block size whose blocks each lie inside one group, for sorted ``g_idx``."""
    k = len(g_idx)
    for bs in NBITS_BLOCKS:
        pad = -k % bs
        g = np.concatenate([g_idx, np.repeat(g_idx[-1:], pad)]).reshape(-1, bs)
        if (g == g[:, :1]).all():
            return bs
    return None


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) integers in [0, 2**bits) -> (rows, n * bits / 8) uint8, first value in the low bits
    (lowbit's LSB-first stream, :func:`lowbit.packing.pack_bits`, with every row whole bytes)."""
    rows, n = values.shape
    assert (n * bits) % 8 == 0, (n, bits)
    ints = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))  # grid values may arrive as floats
    return stream_pack(ints, bits).reshape(rows, -1).numpy()


def _uses_qdq_weight(m: QuantLinear) -> bool:
    qw = m.qweight
    return (
        qw is not None
        and m.act is not None
        and not m.act.spec.dynamic
        and qw.spec.bits == 8
        and qw.spec.granularity in ("channel", "tensor")
        and qw.n_outlier_columns == 0
    )


def linear_problems(name: str, module: nn.Module) -> list[Problem]:
    """Why this linear layer cannot be written as ONNX (empty: it can)."""
    if isinstance(module, nn.Linear):
        return []
    if not isinstance(module, QuantLinear):
        return [Problem(name, "layer type", f"{type(module).__name__} is not a linear layer lowbit can lower")]
    problems = []
    qw = module.qweight
    if qw is not None:
        fmt = qw.spec.fmt
        if not isinstance(fmt, IntFormat):
            problems.append(
                Problem(name, "weights format", f"{fmt.name} weights; ONNX export writes integer weights (int2..int8)")
            )
        else:
            order = np.argsort(qw.g_idx.numpy(), kind="stable")
            if nbits_block(qw.g_idx.numpy()[order]) is None:
                problems.append(
                    Problem(
                        name,
                        "group size",
                        f"groups of {qw.spec.group_size} cannot be split into MatMulNBits blocks "
                        f"(a power of two >= 16 dividing the group size); use groups of 32, 64 or 128",
                    )
                )
    if module.act is not None:
        problems += _act_problems(name, module.act)
    return problems


def _act_problems(name: str, act: ActQuantizer) -> list[Problem]:
    s = act.spec
    where = "input activations"
    if s.outlier_threshold is not None:
        return [Problem(name, where, "LLM.int8() float outlier dimensions (chosen at run time) have no ONNX form")]
    if s.format not in ACT_TYPES:
        return [Problem(name, where, f"{s.format} activations; QuantizeLinear here takes int8 or uint8")]
    if s.dynamic and s.scale_dtype not in ("float32", *SCALE_MAX):
        return [Problem(name, where, f"dynamic scales in {s.scale_dtype}; use float32 or float16 scales")]
    if not s.dynamic and (act.scale is None or act.zero_point is None):
        return [Problem(name, where, "static quantizer without calibrated scale; quantize with calibration data")]
    if not s.dynamic and act.scale is not None and act.scale.numel() != 1:
        return [Problem(name, where, f"static scale of shape {tuple(act.scale.shape)}; only per-tensor is supported")]
    return []


def lower_linear(g: GraphBuilder, x: str, name: str, module: nn.Module, accuracy_level: int = 0) -> str:
    """Nodes computing ``module(x)`` for ``x`` (..., in); returns the output name. Check first."""
    if isinstance(module, nn.Linear):
        return _float_matmul(g, x, name, module.weight, module.bias)
    assert isinstance(module, QuantLinear), name
    if module.act is not None:
        x = quantize_input(g, x, module.act, module.in_features)
    qw = module.qweight
    if qw is None:
        return _float_matmul(g, x, name, module.weight, module.bias)
    if _uses_qdq_weight(module):
        return _qdq_matmul(g, x, name, qw, module.bias)
    return _nbits_matmul(g, x, name, qw, module.bias, accuracy_level)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy()


def _add_bias(g: GraphBuilder, y: str, name: str, bias: torch.Tensor | None) -> str:
    if bias is None:
        return y
    return g.op("Add", y, g.tensor(f"{name}.bias", _np(bias)), name=f"{name}.out")


def _float_matmul(g: GraphBuilder, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    w = g.tensor(f"{name}.weight_t", _np(weight).T)
    return _add_bias(g, g.op("MatMul", x, w, name=f"{name}.matmul"), name, bias)


def _qdq_matmul(g: GraphBuilder, x: str, name: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> str:
    fmt = qw.spec.fmt
    assert isinstance(fmt, IntFormat)
    offset = 128 if fmt.signed else 0  # stored as uint8 (see the module docstring)
    codes = (qw.grid_values().numpy() + offset).astype(np.uint8).T  # (in, out)
    scale = _np(qw.scale).reshape(-1)
    zp = (_np(qw.zero_point).reshape(-1) + offset).astype(np.uint8)
    w = g.tensor(f"{name}.qweight", codes)
    per_axis: dict[str, Any] = {} if scale.size == 1 else {"axis": 1}
    shape = () if scale.size == 1 else scale.shape
    s, z = g.tensor(f"{name}.scales", scale.reshape(shape)), g.tensor(f"{name}.zeros", zp.reshape(shape))
    wf = g.op("DequantizeLinear", w, s, z, name=f"{name}.weight", **per_axis)
    return _add_bias(g, g.op("MatMul", x, wf, name=f"{name}.matmul"), name, bias)


def _nbits_matmul(
    g: GraphBuilder, x: str, name: str, qw: QuantizedWeight, bias: torch.Tensor | None, accuracy_level: int
) -> str:
    n, k = qw.shape
    fmt = qw.spec.fmt
    assert isinstance(fmt, IntFormat)
    q = qw.grid_values().numpy()
    g_idx = qw.g_idx.numpy()
    scale = np.broadcast_to(_np(qw.scale), (n, qw.scale.shape[1]))
    zp = np.broadcast_to(_np(qw.zero_point), (n, qw.zero_point.shape[1]))
    x_in = x
    if qw.outlier_idx is not None:  # float columns: codes at the zero point dequantize to exactly 0
        idx = qw.outlier_idx.numpy()
        q = q.copy()
        q[:, idx] = zp[:, g_idx[idx]]
    order = np.argsort(g_idx, kind="stable")
    if not (order == np.arange(k)).all():  # act-order: make each group contiguous
        q, g_idx = q[:, order], g_idx[order]
        x = g.memo(("gather", x, order.tobytes()), lambda: g.op("Gather", x_in, g.const(order, np.int64), axis=-1))
    bs = nbits_block(g_idx)
    assert bs is not None, name
    bits = nbits_slot(fmt.bits)
    offset = 2 ** (bits - 1) if fmt.signed else 0
    n_blocks = -(-k // bs)
    block_group = g_idx[::bs]
    zp_blocks = zp[:, block_group] + offset
    codes = np.repeat(zp_blocks[:, -1:], n_blocks * bs, axis=1)  # padding dequantizes to 0
    codes[:, :k] = q + offset
    packed = pack_bits(codes, bits).reshape(n, n_blocks, bs * bits // 8)
    inputs = [x, g.tensor(f"{name}.qweight", packed), g.tensor(f"{name}.scales", scale[:, block_group])]
    if (zp_blocks == 2 ** (bits - 1)).all():
        inputs.append("")  # MatMulNBits' default zero point
    else:
        per = 8 // bits
        width = -(-n_blocks // per) * per
        zp_pad = np.zeros((n, width), np.int64)
        zp_pad[:, :n_blocks] = zp_blocks
        inputs.append(g.tensor(f"{name}.qzeros", pack_bits(zp_pad, bits)))
    inputs += ["", "" if bias is None else g.tensor(f"{name}.bias", _np(bias))]
    while inputs[-1] == "":
        inputs.pop()
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": bs, "accuracy_level": accuracy_level}
    y = g.op("MatMulNBits", *inputs, name=f"{name}.matmul", domain=MS_DOMAIN, **attrs)
    if qw.outlier_idx is not None and qw.outlier_weight is not None:
        cols = g.op("Gather", x_in, g.const(qw.outlier_idx.numpy(), np.int64), axis=-1, name=f"{name}.float_in")
        w_out = g.tensor(f"{name}.float_columns_t", _np(qw.outlier_weight).T)
        y = g.op("Add", y, g.op("MatMul", cols, w_out, name=f"{name}.float_matmul"), name=f"{name}.out")
    return y


def quantize_input(g: GraphBuilder, x: str, act: ActQuantizer, width: int) -> str:
    """Fake-quantized ``x`` (..., width) as ``act`` computes it: QuantizeLinear -> DequantizeLinear."""
    s = act.spec
    if not s.dynamic:
        assert act.scale is not None and act.zero_point is not None
        scale, zp = float(act.scale.reshape(())), int(act.zero_point.reshape(()))
        key: tuple[object, ...] = ("qdq", x, s.format, scale, zp)
        return g.memo(key, lambda: _static_qdq(g, x, s.format, scale, zp))
    return g.memo(
        ("qdq", x, s.format, s.granularity, s.symmetric, s.scale_dtype), lambda: _dynamic_qdq(g, x, act, width)
    )


def _static_qdq(g: GraphBuilder, x: str, fmt: str, scale: float, zp: int) -> str:
    sc, z = g.const(scale, np.float32), g.const(zp, ACT_NP[fmt])
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, sc, z, name="act_q"), sc, z, name="act_dq")


def _dynamic_qdq(g: GraphBuilder, x: str, act: ActQuantizer, width: int) -> str:
    s = act.spec
    fmt = s.fmt
    assert isinstance(fmt, IntFormat)
    per_token = s.granularity == "token"
    # per token: one range per hidden vector (keepdims, for blocked QuantizeLinear); else one scalar
    reduce: dict[str, Any] = {"keepdims": 1 if per_token else 0}
    axes = [g.ints(-1)] if per_token else []
    if s.symmetric:
        absmax = g.op("ReduceMax", g.op("Abs", x), *axes, **reduce)
        scale = _round_scale(g, g.op("Div", absmax, g.const((fmt.qmax - fmt.qmin) / 2)), s.scale_dtype)
        zp = g.op("Expand", g.const(symmetric_zero_point(fmt), ACT_NP[fmt.name]), g.op("Shape", scale))
    else:
        lo = g.op("Min", g.op("ReduceMin", x, *axes, **reduce), g.const(0.0))
        hi = g.op("Max", g.op("ReduceMax", x, *axes, **reduce), g.const(0.0))
        scale = _round_scale(g, g.op("Div", g.op("Sub", hi, lo), g.const(float(fmt.qmax - fmt.qmin))), s.scale_dtype)
        zpf = g.op("Round", g.op("Sub", g.const(float(fmt.qmin)), g.op("Div", lo, scale)))
        zpf = g.op("Clip", zpf, g.const(float(fmt.qmin)), g.const(float(fmt.qmax)))
        zp = g.op("Cast", zpf, to=ACT_TYPES[fmt.name])
    block: dict[str, Any] = {"axis": -1, "block_size": width} if per_token else {}
    q = g.op("QuantizeLinear", x, scale, zp, name="act_q", **block)
    return g.op("DequantizeLinear", q, scale, zp, name="act_dq", **block)


def _round_scale(g: GraphBuilder, scale: str, scale_dtype: str) -> str:
    """lowbit's ``_round_scale``: restrict to ``scale_dtype`` (saturating), and 1 where it is 0."""
    if scale_dtype in SCALE_MAX:
        capped = g.op("Min", scale, g.const(SCALE_MAX[scale_dtype]))
        scale = g.op("Cast", g.op("Cast", capped, to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
    positive = g.op("Greater", scale, g.const(0.0))
    return g.op("Where", positive, scale, g.const(1.0))
