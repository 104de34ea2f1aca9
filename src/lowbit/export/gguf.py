"""GGUF for llama.cpp: one ``model-<TYPE>.gguf`` with the model, its tokenizer and its metadata.

Quantized linears go into one block type (``--opt type=``): lowbit's codes and scales are written
unchanged where the type holds the grid (int4/int8/int5 symmetric, uint4 asymmetric ... in groups
that are multiples of 32: see :mod:`lowbit.export.gguf_layers`), and re-quantized from lowbit's
dequantized weights otherwise, with a note saying which layers, why and the error added. With no
``type``, the smallest type that holds every layer exactly is chosen, or the export is refused.
Norms and biases are float32; the embedding and an unquantized lm_head are float16 (or
``--opt embeddings=TYPE``); a tied lm_head is written once. Refused: activation or KV-cache
quantization (llama.cpp quantizes activations and its KV cache its own way, so the result would
silently differ), OWQ float columns, architectures whose entry in :data:`lowbit.archs.ARCHS` has no
``gguf`` part (the names, metadata keys and quirks come from there), and rows that are not whole blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import Exporter, Problem, kv_spec, quantized_linears
from lowbit.export.gguf_blocks import BLOCK_TYPES
from lowbit.export.gguf_layers import (
    EXACT_ORDER,
    FLOAT_TYPES,
    TYPE_NAMES,
    Encoded,
    carry_reason,
    encode_float,
    encode_quantized,
    relative_error,
)
from lowbit.export.gguf_names import GGUF_ARCHS, GGUFArch, gguf_arch, head_row_order
from lowbit.export.gguf_tokenizer import tokenizer_meta
from lowbit.modules import QuantLinear

_CANONICAL = {n.lower(): n for n in TYPE_NAMES}
_EMBEDDINGS = ("token_embd.weight", "output.weight")


def _type_option(options: Mapping[str, str], key: str) -> str | None:
    value = options.get(key)
    if value is None or value == "":
        return None
    if value.lower() not in _CANONICAL:
        raise LowbitError(f"gguf option {key}={value!r} is not a type; choose one of: {', '.join(TYPE_NAMES)}")
    return _CANONICAL[value.lower()]


@dataclass
class _Tensor:
    hf: str  # state-dict key
    gguf: str
    tensor: torch.Tensor
    qlinear: QuantLinear | None = None  # the QuantLinear whose quantized weight this is
    linear: bool = False  # a linear layer's weight kept in float

    @property
    def layer(self) -> str:
        return self.hf.removesuffix(".weight")


@dataclass
class _Plan:
    arch: GGUFArch | None
    tensors: list[_Tensor] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    tied: bool = False


def _config_value(config: Any, attr: str) -> Any:
    value = getattr(config, attr, None)
    if attr == "num_key_value_heads" and value is None:
        return config.num_attention_heads
    return value


def _rope(config: Any) -> tuple[str, float | None]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return str(kind), theta


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _embedding_weight(model: nn.Module, getter: str) -> torch.Tensor | None:
    module = getattr(model, getter)()
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _plan(model: nn.Module) -> _Plan:
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = gguf_arch(model_type)
    if arch is None:
        detail = f"{model_type!r}; the GGUF exporter writes {', '.join(GGUF_ARCHS)}"
        return _Plan(None, problems=[Problem("model", "architecture", detail)])
    plan = _Plan(arch)
    for attr, want in arch.config_must.items():
        have = getattr(config, attr, want)
        if have != want:
            plan.problems.append(Problem("model", attr, f"{have!r}; llama.cpp's {arch.arch} needs {want!r}"))
    kind, theta = _rope(config)
    if kind != "default" or theta is None:
        detail = f"rope type {kind!r}; the exporter writes plain RoPE (rope_type 'default' with a rope_theta)"
        plan.problems.append(Problem("model", "rope scaling", detail))
    hidden, heads = config.hidden_size, config.num_attention_heads
    if not arch.head_dim_key and _head_dim(config) * heads != hidden:
        detail = f"head_dim {_head_dim(config)} != hidden_size/heads ({hidden}/{heads}); {arch.arch} readers assume it"
        plan.problems.append(Problem("model", "head size", detail))
    modules = dict(model.named_modules())
    w_in, w_out = _embedding_weight(model, "get_input_embeddings"), _embedding_weight(model, "get_output_embeddings")
    plan.tied = w_in is not None and w_out is not None and w_in.data_ptr() == w_out.data_ptr()
    for hf, tensor in model.state_dict().items():
        owner_name, _, leaf = hf.rpartition(".")
        owner = modules.get(owner_name)
        if isinstance(owner, QuantLinear) and leaf not in ("weight", "bias"):
            continue  # activation-quantizer state: refused below with its own reason
        name = arch.gguf_name(hf)
        if name is None:
            plan.problems.append(Problem(hf, "tensor", f"llama.cpp's {arch.arch} has no tensor for it"))
            continue
        if name == "output.weight" and plan.tied:
            continue
        is_q = isinstance(owner, QuantLinear) and owner.qweight is not None and leaf == "weight"
        linear = leaf == "weight" and isinstance(owner, nn.Linear | QuantLinear) and name not in _EMBEDDINGS
        plan.tensors.append(_Tensor(hf, name, tensor, owner if is_q else None, linear and not is_q))
    return plan


def _layer_problems(model: nn.Module, plan: _Plan, qtype: str | None, etype: str | None) -> list[Problem]:
    problems = []
    for name, m in quantized_linears(model):
        if m.act is not None:
            detail = (
                f"{m.act.spec.describe()}; llama.cpp quantizes activations its own way (Q8 blocks of 32), "
                "so the result would differ: export a weight-only model"
            )
            problems.append(Problem(name, "input activations", detail))
        if m.qweight is not None and m.qweight.n_outlier_columns:
            detail = "OWQ keeps input columns in float16, which GGUF blocks cannot hold"
            problems.append(Problem(name, "float columns", detail))
    spec = kv_spec(model)
    if spec is not None:
        detail = (
            f"{spec.describe()}; llama.cpp quantizes its KV cache at run time (--cache-type-k/-v), not from the file: "
            "export a model without KV-cache quantization"
        )
        problems.append(Problem("kv_cache", "KV cache", detail))
    for t in plan.tensors:
        want = (qtype or "Q4_0") if t.qlinear is not None else etype if t.gguf in _EMBEDDINGS else None
        block = BLOCK_TYPES.get(want or "")
        if block is not None and t.tensor.shape[-1] % block.size:
            detail = f"rows of {t.tensor.shape[-1]} weights are not whole {block.name} blocks of {block.size}"
            problems.append(Problem(t.layer, "shape", detail + "; choose a type with blocks of 32, or f16"))
    return problems


def _auto_type(plan: _Plan) -> tuple[str | None, list[Problem]]:
    """The smallest type holding every quantized linear exactly (or f16 with none), else problems."""
    layers = [t for t in plan.tensors if t.qlinear is not None]
    if not layers:
        return "f16", []
    fits = {}
    for t in layers:
        assert t.qlinear is not None and t.qlinear.qweight is not None
        fits[t.hf] = {n for n in EXACT_ORDER if carry_reason(t.qlinear.qweight, BLOCK_TYPES[n]) is None}
    common = [n for n in EXACT_ORDER if all(n in f for f in fits.values())]
    if common:
        return common[0], []
    choose = f"choose one with --opt type={'|'.join(TYPE_NAMES)} (layers that do not fit are re-quantized, with a note)"
    problems = []
    for t in layers:
        qw = t.qlinear.qweight if t.qlinear is not None else None
        assert qw is not None
        if not fits[t.hf]:
            why = carry_reason(qw, BLOCK_TYPES["Q8_0"])
            problems.append(
                Problem(t.layer, "weights grid", f"no GGUF type holds {qw.spec.describe()} exactly ({why}); {choose}")
            )
    if not problems:  # each fits some type, but no type fits them all
        problems.append(Problem("model", "weights grid", f"the layers' grids fit no single GGUF type; {choose}"))
    return None, problems


class GGUFExporter(Exporter):
    name = "gguf"
    description = "llama.cpp GGUF (f16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q4_K, Q6_K), one file with the tokenizer"
    options_help: ClassVar[dict[str, str]] = {
        "type": f"block type of the quantized linears: {', '.join(TYPE_NAMES)} (default: the smallest type "
        "that holds lowbit's grid exactly; others re-quantize, with a note)",
        "embeddings": f"type of the embedding and an unquantized lm_head: {', '.join(TYPE_NAMES)} (default f16)",
    }

    def check(self, model: nn.Module, options: Mapping[str, str]) -> list[Problem]:
        qtype, etype = _type_option(options, "type"), _type_option(options, "embeddings") or "f16"
        plan = _plan(model)
        problems = plan.problems + _layer_problems(model, plan, qtype, etype)
        if qtype is None and not problems:
            problems += _auto_type(plan)[1]
        return problems

    def write(self, model: nn.Module, tokenizer: Any, out: Path, options: Mapping[str, str]) -> list[str]:
        if tokenizer is None:
            raise LowbitError("GGUF files carry the tokenizer, and none was given: pass the model's tokenizer")
        plan = _plan(model)
        assert plan.arch is not None and not plan.problems, "check() refuses these models"
        qtype = _type_option(options, "type") or _auto_type(plan)[0]
        etype = _type_option(options, "embeddings") or "f16"
        assert qtype is not None
        config: Any = model.config
        w_in = _embedding_weight(model, "get_input_embeddings")
        assert w_in is not None
        n_vocab = int(w_in.shape[0])
        meta = tokenizer_meta(tokenizer, n_vocab)
        writer = GGUFWriter(out / f"model-{qtype}.gguf", plan.arch.arch)
        _write_metadata(writer, plan.arch, config, qtype, n_vocab)
        meta.write(writer)
        report = _Report(qtype, etype, plan.tied)
        for t in plan.tensors:
            enc = _encode(t, qtype, etype)
            report.add(t, enc)
            heads = plan.arch.permute.get(t.gguf.split(".", 2)[-1]) if t.gguf.startswith("blk.") else None
            if heads is not None:
                enc.permute_rows(head_row_order(enc.data.shape[0], int(_config_value(config, heads))))
            writer.add_tensor(t.gguf, enc.data, raw_dtype=enc.raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return report.notes() + meta.notes


def _tensor_type(t: _Tensor, qtype: str, etype: str) -> str:
    if t.qlinear is not None:
        return qtype
    if t.gguf in _EMBEDDINGS:
        return etype
    if t.linear:  # a linear lowbit left in float
        return "f32" if qtype == "f32" else "f16"
    return "f32"  # norms, biases


def _encode(t: _Tensor, qtype: str, etype: str) -> Encoded:
    if t.qlinear is not None and t.qlinear.qweight is not None:
        return encode_quantized(t.qlinear.qweight, qtype)
    return encode_float(t.tensor, _tensor_type(t, qtype, etype))


def _write_metadata(w: GGUFWriter, arch: GGUFArch, config: Any, qtype: str, n_vocab: int) -> None:
    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/").rpartition("/")[-1]
    w.add_name(name or "lowbit model")
    w.add_type("model")
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}.get(qtype)
    w.add_file_type(int(file_type if file_type is not None else BLOCK_TYPES[qtype].file_type))
    w.add_quantization_version(GGML_QUANT_VERSION)
    a = arch.arch
    for key, attr in arch.int_keys.items():
        w.add_uint32(f"{a}.{key}", int(_config_value(config, attr)))
    for key, attr in arch.float_keys.items():
        w.add_float32(f"{a}.{key}", float(_config_value(config, attr)))
    theta = _rope(config)[1]
    assert theta is not None  # check() refuses a model without one
    w.add_float32(f"{a}.rope.freq_base", float(theta))
    w.add_uint32(f"{a}.vocab_size", n_vocab)
    head_dim = _head_dim(config)
    if arch.head_dim_key:
        w.add_uint32(f"{a}.rope.dimension_count", head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        w.add_uint32(f"{a}.attention.key_length", head_dim)
        w.add_uint32(f"{a}.attention.value_length", head_dim)


@dataclass
class _Report:
    """What happened to each tensor, summed up in notes."""

    qtype: str
    etype: str
    tied: bool
    carried: list[tuple[int, int, float, float]] = field(default_factory=list)  # rounded, blocks, max change, rel
    requantized: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # reason -> (layer, rel error)
    floats: list[tuple[str, str, float]] = field(default_factory=list)  # embeddings: (tensor, type, rel error)
    float_linears: list[tuple[str, float]] = field(default_factory=list)  # (tensor, rel error)

    def add(self, t: _Tensor, enc: Encoded) -> None:
        if t.qlinear is not None and t.qlinear.qweight is not None:
            ref = t.qlinear.qweight.dequantize().numpy()
            if enc.carried:
                change = float(np.abs(enc.values - ref).max(initial=0.0))
                self.carried.append((enc.rounded, enc.blocks, change, relative_error(enc.values, ref)))
            else:
                self.requantized.setdefault(enc.reason, []).append((t.layer, relative_error(enc.values, ref)))
        elif t.gguf in _EMBEDDINGS or t.linear:
            ref = t.tensor.detach().to(torch.float32).numpy()
            if t.linear:
                self.float_linears.append((t.layer, relative_error(enc.values, ref)))
            else:
                self.floats.append((t.gguf, self.etype, relative_error(enc.values, ref)))

    def notes(self) -> list[str]:
        notes = []
        if self.carried:
            text = f"{len(self.carried)} quantized linear(s) written as {self.qtype} with lowbit's codes unchanged; "
            rounded, blocks = sum(c[0] for c in self.carried), sum(c[1] for c in self.carried)
            if rounded == 0:
                text += "the file's weights equal lowbit's dequantized weights bit for bit"
            else:
                what = "scale or minimum m = -scale*zero_point" if BLOCK_TYPES[self.qtype].affine else "scale"
                text += (
                    f"in {rounded} of {blocks} blocks the {what} is not a float16 and was rounded to one "
                    f"(largest weight change {max(c[2] for c in self.carried):.3g}, relative error at most "
                    f"{max(c[3] for c in self.carried):.3g}); the other blocks equal lowbit's weights bit for bit"
                )
            notes.append(text)
        for reason, layers in self.requantized.items():
            errs = [e for _, e in layers]
            if self.qtype in FLOAT_TYPES:
                notes.append(
                    f"{len(layers)} quantized linear(s) written as lowbit's dequantized weights in {self.qtype} "
                    f"(relative rounding error mean {np.mean(errs):.3g}, max {max(errs):.3g})"
                )
                continue
            notes.append(
                f"re-quantized {len(layers)} linear(s) into {self.qtype} from lowbit's dequantized weights because "
                f"{reason}: {_names(layers)}; relative error added to lowbit's weights: mean {np.mean(errs):.3g}, "
                f"max {max(errs):.3g}"
            )
        if self.float_linears:
            typ = "f32" if self.qtype == "f32" else "f16"
            worst = max(e for _, e in self.float_linears)
            notes.append(
                f"{len(self.float_linears)} linear(s) lowbit left unquantized written as {typ} (relative rounding "
                f"error at most {worst:.3g}): {_names(self.float_linears)}"
            )
        for name, typ, err in self.floats:
            notes.append(f"{name} written as {typ} (relative rounding error {err:.3g})")
        if self.tied:
            notes.append("lm_head is tied to the embedding: written once, as token_embd")
        return notes


def _names(items: list[tuple[str, float]]) -> str:
    shown = ", ".join(n for n, _ in items[:3])
    return shown + (f", ... ({len(items)} in all)" if len(items) > 3 else "")


EXPORTER = GGUFExporter()
