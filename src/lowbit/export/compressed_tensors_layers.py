"""How one layer maps to compressed-tensors (see :mod:`lowbit.export.compressed_tensors`): the
scheme of each quantized linear and of the KV cache, the reasons a layer cannot be held, and the
tensors a layer becomes (int32 packing as compressed-tensors reads it, MXFP4 nibbles, FP8 bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.export.base import Problem, dividing_groups, kv_quantizers
from lowbit.formats import Format, IntFormat
from lowbit.modules import QuantLinear
from lowbit.packing import pack_int32_rows
from lowbit.primitives import group_index
from lowbit.scheme import QuantSpec

# (weights, input activations) -> (group format, weight granularities, weights must be symmetric):
# the schemes compressed-tensors' runtimes (vLLM kernels, transformers) have a path for
SCHEMES: dict[tuple[str, str | None], tuple[str, tuple[str, ...], bool]] = {
    ("int4", None): ("pack-quantized", ("channel", "group"), False),
    ("int8", None): ("pack-quantized", ("channel", "group"), False),
    ("int8", "int8"): ("int-quantized", ("channel", "tensor"), True),
    ("int4", "int8"): ("int-quantized", ("channel", "group"), True),
    ("fp8", None): ("naive-quantized", ("channel", "tensor"), True),
    ("fp8", "fp8"): ("float-quantized", ("channel", "tensor"), True),
    ("fp4", None): ("mxfp4-pack-quantized", ("group",), True),
}
MX_GROUP = 32  # MXFP4: fp4_e2m1 in groups of 32 with a power-of-two (E8M0) scale each
STRATEGIES = {"tensor": "tensor", "channel": "channel", "group": "group", "token": "token", "head": "attn_head"}


def _kind(fmt: Format) -> str | None:
    """``int4`` / ``int8`` / ``fp8`` / ``fp4``: the element types compressed-tensors stores, else None."""
    if isinstance(fmt, IntFormat):
        return f"int{fmt.bits}" if fmt.bits in (4, 8) else None
    return {"fp8_e4m3": "fp8", "fp4_e2m1": "fp4"}.get(fmt.name)


def _offset(fmt: Format) -> int:
    """What to subtract from lowbit's integer codes and zero points for compressed-tensors' signed ones."""
    return int(fmt.qmin) + 2 ** (fmt.bits - 1) if isinstance(fmt, IntFormat) else 0


def _args(spec: QuantSpec) -> dict[str, Any]:
    return {
        "num_bits": spec.bits,
        "type": "float" if spec.fmt.is_float else "int",
        "symmetric": spec.symmetric,
        "strategy": STRATEGIES[spec.granularity],
        "group_size": spec.group_size,
        "dynamic": spec.dynamic,
    }


def _exact(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.to(dtype).to(t.dtype), t)


@dataclass(frozen=True)
class LayerPlan:
    """A linear's compressed-tensors scheme: QuantizationArgs fields and the group format."""

    weights: dict[str, Any]
    inputs: dict[str, Any] | None
    format: str

    def key(self) -> str:
        return json.dumps([self.weights, self.inputs, self.format], sort_keys=True)


# why a property has no compressed-tensors equivalent, and what to do ("prop/variant" keys share a prop)
WHY = {
    "weights": "float weights with quantized input activations: compressed-tensors has no activation-only scheme",
    "weights format": "{}: compressed-tensors stores int4/uint4, int8/uint8, fp8_e4m3 or MXFP4 weights",
    "float columns": "{} input columns kept in float16 (OWQ); compressed-tensors has no float columns",
    "act-order g_idx": "GPTQ act-order regrouped the columns (g_idx), which compressed-tensors 0.20 removed "
    "(actorder 'group'): re-quantize with static_groups: true",
    "group size": "groups of {} do not divide the {} input columns ({}); compressed-tensors needs whole groups",
    "group size/mx": "fp4 groups of {}: MXFP4 groups are 32 columns",
    "scale dtype": "{} scales that {} cannot hold exactly (compressed-tensors keeps scales in the model's dtype): "
    "export with --opt dtype=float32, or re-quantize with scale_dtype {}",
    "weights scale dtype/mx": "{} scales: MXFP4 stores powers of two 2**-127..2**127 (quantize with scale_dtype pow2)",
    "dtype/mx": "MXFP4 weights decompress to bfloat16 in compressed-tensors: export with --opt dtype=bfloat16",
    "weights + input activations": "{} weights with {} activations; compressed-tensors' runtimes take {}",
    "weights granularity": "per-{} {}: this scheme takes {}",
    "weights symmetric": "asymmetric {}: the runtimes need symmetric weights",
    "input activations format": "{}: compressed-tensors takes int8 or fp8_e4m3 activations",
    "input activations": "LLM.int8() outlier dimensions (outlier_threshold {}): compressed-tensors quantizes every "
    "input dimension, it has no float path",
    "input activations granularity": "{} per-{}: the runtimes read dynamic per-token or static per-tensor activations",
    "input activations scale dtype": "{}: dynamic scales are computed at run time in the activations' dtype",
    "kv_cache granularity": "dynamic per-{}: compressed-tensors' kv_cache_scheme holds static k_scale/v_scale; "
    "quantize the KV cache with granularity tensor or head",
    "kv_cache format": "{}: compressed-tensors takes an int8 or fp8_e4m3 KV cache",
    "kv_cache symmetric": "asymmetric: vLLM reads symmetric KV-cache scales only",
    "tensor": "{} has no place in the {} architecture (a transform such as OS+ added it); loaders would drop it",
}


def _why(layer: str, key: str, *args: Any) -> Problem:
    return Problem(layer, key.partition("/")[0], WHY[key].format(*args))


def _scale_problems(name: str, what: str, scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> list[Problem]:
    if _exact(scale, dtype):
        return []
    dt = str(dtype).removeprefix("torch.")
    return [Problem(name, f"{what} scale dtype", WHY["scale dtype"].format(spec.scale_dtype, dt, dt))]


def _act_problems(name: str, spec: QuantSpec) -> list[Problem]:
    out = []
    if _kind(spec.fmt) not in ("int8", "fp8"):
        out.append(_why(name, "input activations format", spec.format))
    if spec.outlier_threshold is not None:
        out.append(_why(name, "input activations", spec.outlier_threshold))
    if (spec.granularity, spec.dynamic) not in (("token", True), ("tensor", False)):
        out.append(
            _why(name, "input activations granularity", "dynamic" if spec.dynamic else "static", spec.granularity)
        )
    if spec.dynamic and spec.scale_dtype != "float32":
        out.append(_why(name, "input activations scale dtype", spec.scale_dtype))
    return out


def _mx_problems(name: str, spec: QuantSpec, scale: torch.Tensor, dtype: torch.dtype) -> list[Problem]:
    mant, exp = torch.frexp(scale.to(torch.float32))
    out = []
    if spec.group_size != MX_GROUP:
        out.append(_why(name, "group size/mx", spec.group_size))
    if not bool((mant == 0.5).all()) or int(exp.min()) - 1 < -127 or int(exp.max()) - 1 > 127:
        out.append(_why(name, "weights scale dtype/mx", spec.scale_dtype))
    if dtype != torch.bfloat16:
        out.append(_why(name, "dtype/mx"))
    return out


def _weight_problems(
    name: str, m: QuantLinear, akind: str | None, dtype: torch.dtype
) -> tuple[str | None, list[Problem]]:
    """(group format or None, problems) of a layer's weights, given its activations' kind."""
    qw = m.qweight
    assert qw is not None
    spec, wkind = qw.spec, _kind(qw.spec.fmt)
    gs = spec.group_size if spec.granularity == "group" else None
    out = [] if wkind else [_why(name, "weights format", spec.format)]
    if qw.n_outlier_columns:
        out.append(_why(name, "float columns", qw.n_outlier_columns))
    if not torch.equal(qw.g_idx, group_index(m.in_features, gs)):
        out.append(_why(name, "act-order g_idx"))
    if gs is not None and m.in_features % gs:
        out.append(_why(name, "group size", gs, m.in_features, dividing_groups(m.in_features)))
    if wkind == "fp4":
        out += _mx_problems(name, spec, qw.scale, dtype)
    elif wkind is not None:
        out += _scale_problems(name, "weights", qw.scale, spec, dtype)
    if wkind is None or (m.act is not None and akind is None):
        return None, out
    if (wkind, akind) not in SCHEMES:
        kinds = ", ".join(f"{w}{'+' + a if a else ' weight-only'}" for w, a in SCHEMES)
        return None, [*out, _why(name, "weights + input activations", wkind, akind, kinds)]
    fmt, granularities, symmetric_only = SCHEMES[(wkind, akind)]
    what = f"{wkind} weights" + (f" with {akind} activations" if akind else "")
    if spec.granularity not in granularities:
        out.append(_why(name, "weights granularity", spec.granularity, what, " or ".join(granularities)))
    if symmetric_only and not spec.symmetric:
        out.append(_why(name, "weights symmetric", what))
    return fmt, out


def layer_plan(name: str, m: QuantLinear, dtype: torch.dtype) -> tuple[LayerPlan | None, list[Problem]]:
    """How one QuantLinear maps to compressed-tensors, or why it cannot."""
    if m.qweight is None:
        return None, [_why(name, "weights")]
    aspec = m.act.spec if m.act is not None else None
    problems = _act_problems(name, aspec) if aspec is not None else []
    akind = _kind(aspec.fmt) if aspec is not None else None
    fmt, weight_problems = _weight_problems(name, m, akind if akind in ("int8", "fp8") else None, dtype)
    problems += weight_problems
    if m.act is not None and aspec is not None and m.act.scale is not None and not aspec.dynamic:
        problems += _scale_problems(name, "input activations", m.act.scale, aspec, dtype)
    if problems or fmt is None:
        return None, problems
    weights = _args(m.qweight.spec)
    if fmt == "mxfp4-pack-quantized":
        weights.update(scale_dtype="torch.uint8", zp_dtype="torch.uint8")  # as llm-compressor's MXFP4 preset
    return LayerPlan(weights, _args(aspec) if aspec is not None else None, fmt), []


def kv_plan(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, Any] | None, list[Problem]]:
    """``kv_cache_scheme`` fields for the model's KV cache (None if it is not quantized), or why not."""
    kvs = kv_quantizers(model)
    if not kvs:
        return None, []
    spec = kvs[0][1].spec
    problems = [_why("kv_cache", "kv_cache granularity", spec.granularity)] if spec.dynamic else []
    if spec.bits != 8 or _kind(spec.fmt) is None:
        problems.append(_why("kv_cache", "kv_cache format", spec.format))
    if not spec.symmetric:
        problems.append(_why("kv_cache", "kv_cache symmetric"))
    for name, q in kvs:
        for kind, (scale, _) in q.qparams.items():
            problems += _scale_problems(name, f"kv_cache {kind}", scale, spec, dtype)
    return (None if problems else _args(spec)), problems


def linear_tensors(name: str, m: QuantLinear, plan: LayerPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (without its bias)."""
    qw = m.qweight
    assert qw is not None
    spec, fmt = qw.spec, qw.spec.fmt
    scale = qw.scale.reshape(1) if spec.granularity == "tensor" else qw.scale
    t = {"weight_scale": scale.to(dtype)}
    if isinstance(fmt, IntFormat):
        off, half = _offset(fmt), 2 ** (fmt.bits - 1)
        q = qw.grid_values().to(torch.int32) - off
        zp = qw.zero_point.reshape(scale.shape).to(torch.int32) - off
        if plan.format == "pack-quantized":
            t["weight_packed"] = pack_int32_rows(q + half, fmt.bits)
            t["weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
            if not spec.symmetric:
                t["weight_zero_point"] = pack_int32_rows((zp + half).T, fmt.bits).T.contiguous()
        else:
            t["weight"] = q.to(torch.int8)
            if not spec.symmetric:
                t["weight_zero_point"] = zp.to(torch.int8)
    elif plan.format == "mxfp4-pack-quantized":  # two fp4 bit patterns a byte, even column low
        t["weight_packed"] = (qw.codes[:, 0::2] | qw.codes[:, 1::2] << 4).contiguous()
        t["weight_scale"] = (torch.frexp(qw.scale.to(torch.float32))[1] + 126).to(torch.uint8)  # 2**e -> e + 127
    else:
        t["weight"] = qw.codes.view(torch.float8_e4m3fn)
    act = m.act
    if act is not None and not act.spec.dynamic and act.scale is not None and act.zero_point is not None:
        t["input_scale"] = act.scale.reshape(1).to(dtype)
        if not act.spec.symmetric:
            t["input_zero_point"] = (act.zero_point.reshape(1) - _offset(act.spec.fmt)).to(torch.int8)
    return {f"{name}.{k}": v for k, v in t.items()}
