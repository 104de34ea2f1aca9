"""Export to compressed-tensors: the format vLLM and transformers (with the ``compressed-tensors``
package) load, as llm-compressor writes it.

The output is a Hugging Face model directory: ``config.json`` whose ``quantization_config`` is
written by compressed-tensors' own ``ModelCompressor`` (``quant_method: compressed-tensors``,
``quantization_status: compressed``, ``config_groups``, ``ignore``, ``kv_cache_scheme``),
``model.safetensors``, the tokenizer and the generation config.

Mapping, per quantized linear ``NAME`` (one config group per distinct scheme; with one group it
targets ``Linear`` and ``ignore`` lists the float linears such as ``lm_head``, with several each
group lists its layers by name):

- int4/uint4 or int8/uint8 weights only, per channel or in whole groups -> ``pack-quantized``:
  ``weight_packed`` int32 (out, ceil(in*b/32)), each row the codes ``q + 2**(b-1)`` as a dense
  LSB-first bit stream along the input dimension; ``weight_scale`` (out, G); ``weight_shape``;
  for asymmetric weights ``weight_zero_point`` ``zp + 2**(b-1)`` packed the same way along the
  *output* dimension, (ceil(out*b/32), G).
- int8 weights + int8 activations (W8A8), int4 groups + int8 activations (W4A8) ->
  ``int-quantized``: ``weight`` int8, ``weight_scale`` (, ``weight_zero_point`` int8).
- fp8_e4m3 weights per channel or tensor -> ``naive-quantized`` (weight only) or, with
  fp8_e4m3 activations, ``float-quantized``: ``weight`` float8_e4m3fn, ``weight_scale``.
- fp4_e2m1 weights in groups of 32 with power-of-two scales (lowbit's ``mxfp4``) ->
  ``mxfp4-pack-quantized``: ``weight_packed`` uint8 (two bit patterns a byte, even column in the
  low nibble), ``weight_scale`` uint8 E8M0 exponents; compressed-tensors decompresses them to
  bfloat16, so these export with ``dtype=bfloat16`` only.
- Activations: dynamic per token (``strategy: token``), or static per tensor with
  ``input_scale`` (and ``input_zero_point`` int8 when asymmetric).
- KV cache: static per-tensor (``tensor``) or per-KV-head (``attn_head``) symmetric int8/fp8 ->
  ``kv_cache_scheme`` with ``ATTN.k_scale`` / ``ATTN.v_scale`` (see :func:`kv_scale_tensors` for
  why these names and not the older ``k_proj.output_scale``).

compressed-tensors' integers are signed, ``w = scale * (q - zero_point)`` with ``q`` and the zero
point in ``[-2**(b-1), 2**(b-1) - 1]`` (zero point absent: 0). lowbit's unsigned grids (uintB) are
the same weights with codes and zero points shifted by ``-2**(B-1)``. compressed-tensors keeps
scales in the model's dtype (the ``dtype`` option), so a layer whose scales that dtype cannot hold
exactly is refused, as are grids it has no equivalent for: other bit widths and float formats,
act-order ``g_idx`` (compressed-tensors 0.20 removed it), OWQ float columns, LLM.int8() outlier
dimensions, groups that do not divide the input, dynamic or asymmetric KV caches, and biases the
architecture has no place for (OS+). transformers' CPU path decompresses every layer to its float
weight on the first forward and fake-quantizes activations with compressed-tensors' own code
(which, unlike vLLM and lowbit, does not round dynamic asymmetric zero points).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import init_empty_weights
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from lowbit.checkpoint import plain_tensors
from lowbit.errors import LowbitError
from lowbit.export.base import Exporter, Problem, kv_quantizers, quantized_linears
from lowbit.export.compressed_tensors_layers import WHY, LayerPlan, kv_plan, layer_plan, linear_tensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# vLLM fuses these projections into one layer and needs one scheme for all of their parts
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _reference_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the architecture the config describes (what loaders have a place for)."""
    config: Any = copy.deepcopy(model.config)
    with init_empty_weights():
        ref = AutoModelForCausalLM.from_config(config)
    return set(ref.state_dict())


def _float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that is not a quantized layer's or the KV quantizer's (tied ones once), and the biases."""
    out = plain_tensors(model)
    for name, m in quantized_linears(model):
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias
    return out


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    description = "Hugging Face directory with a compressed-tensors quantization_config (vLLM, transformers)"
    options_help: ClassVar[Mapping[str, str]] = {
        "dtype": "dtype of the float tensors and scales: float32, float16 or bfloat16 (default: the model's own)",
    }

    def _dtype(self, model: nn.Module, options: Mapping[str, str]) -> torch.dtype:
        name = options.get("dtype")
        if name is None:
            dtype = getattr(model, "dtype", torch.float32)
            return dtype if dtype in DTYPES.values() else torch.float32
        if name not in DTYPES:
            raise LowbitError(f"dtype={name!r} is not one of {', '.join(DTYPES)} (e.g. --opt dtype=bfloat16)")
        return DTYPES[name]

    def _plans(self, model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, LayerPlan], list[Problem]]:
        plans, problems = {}, []
        for name, m in quantized_linears(model):
            plan, layer_problems = layer_plan(name, m, dtype)
            problems += layer_problems
            if plan is not None:
                plans[name] = plan
        return plans, problems

    def check(self, model: nn.Module, options: Mapping[str, str]) -> list[Problem]:
        dtype = self._dtype(model, options)
        _, problems = self._plans(model, dtype)
        kv, kv_problems = kv_plan(model, dtype)
        problems += kv_problems
        if not quantized_linears(model) and kv is None and not kv_problems:
            problems.append(Problem("model", "quantization", "nothing is quantized; quantize the model first"))
        known = _reference_keys(model)
        for key in _float_tensors(model):
            if key not in known:
                layer, _, what = key.rpartition(".")
                problems.append(Problem(layer, what, WHY["tensor"].format(key, type(model).__name__)))
        return problems

    def write(self, model: nn.Module, tokenizer: Any, out: Path, options: Mapping[str, str]) -> list[str]:
        dtype = self._dtype(model, options)
        plans, problems = self._plans(model, dtype)
        kv, kv_problems = kv_plan(model, dtype)
        assert not problems and not kv_problems, "write() called on a model check() refuses"
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _float_tensors(model).items()}
        for name, m in quantized_linears(model):
            tensors.update(linear_tensors(name, m, plans[name], dtype))
        tensors.update(kv_scale_tensors(model, dtype))
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        qconfig = _quant_config(plans, ignore, kv)

        config: Any = copy.deepcopy(model.config)
        config.dtype = dtype
        config.architectures = [type(model).__name__]  # vLLM picks its model class by it
        config._attn_implementation = None  # lowbit's KV attention is not the runtimes' business
        config.save_pretrained(out)
        ModelCompressor(quantization_config=qconfig).update_config(str(out))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return _notes(model, plans, ignore, kv, dtype)


def kv_scale_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``ATTN.k_scale`` / ``ATTN.v_scale`` of every attention module with a KV quantizer.

    The names are the attention module's own, as compressed-tensors (0.10 to 0.20 at least) registers
    them (``initialize_attn_qparams``: ``k_scale``/``v_scale`` on the attention module, shape (1,) per
    tensor or (kv_heads, 1, 1) per head) and as vLLM's loader reads them (``self_attn.k_scale`` into
    ``attn.k_scale``). The older llm-compressor layout, ``k_proj.output_scale``, quantized the
    projection's output, i.e. keys *before* RoPE; lowbit quantizes the cached keys after RoPE, as
    compressed-tensors' KV-cache hook and vLLM do, so writing it there would describe another model.
    """
    out = {}
    for name, q in kv_quantizers(model):
        for kind, (scale, _) in q.qparams.items():
            shape = (1,) if q.spec.granularity == "tensor" else (-1, 1, 1)
            out[f"{name}.{kind}_scale"] = scale.reshape(shape).to(dtype)
    return out


def kv_scheme_ignored_by_transformers(model: nn.Module) -> str:
    """Why transformers, loading the export with the installed compressed-tensors, will not apply
    its ``kv_cache_scheme`` ('' when it will, or when this compressed-tensors cannot say).

    compressed-tensors quantizes the KV cache only of attention modules it recognises as cached
    (``is_cached_attention_module``: a forward that takes ``past_key_value(s)``). transformers 5.24
    renamed that argument ``cache``, and compressed-tensors 0.20.1 does not know the new name: the
    KV cache then runs in float and ``k_scale``/``v_scale`` are reported as unexpected keys. The files
    are still right for vLLM, which reads the scales itself; this is checked on the model's own
    attention classes, so it follows whatever pair of versions is installed.
    """
    try:
        from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module
    except ImportError:  # older compressed-tensors: no such predicate to ask
        return ""
    attention = [model.get_submodule(name) for name, _ in kv_quantizers(model)]
    if not attention or any(is_cached_attention_module(m) for m in attention):
        return ""
    import compressed_tensors
    import transformers

    cls = type(attention[0]).__name__
    return (
        f"KV cache: transformers {transformers.__version__} with compressed-tensors "
        f"{compressed_tensors.__version__} will not apply kv_cache_scheme ({cls}.forward takes no "
        "past_key_values argument, which compressed-tensors looks for); it reports k_scale/v_scale as "
        "unexpected and runs the KV cache in float. vLLM reads them"
    )


def _quant_config(plans: dict[str, LayerPlan], ignore: list[str], kv: dict[str, Any] | None) -> QuantizationConfig:
    groups: dict[str, list[str]] = {}
    for name, plan in plans.items():
        groups.setdefault(plan.key(), []).append(name)
    config_groups = {}
    for i, names in enumerate(groups.values()):
        plan = plans[names[0]]
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if len(groups) == 1 else names,
            weights=QuantizationArgs(**plan.weights),
            input_activations=QuantizationArgs(**plan.inputs) if plan.inputs else None,
            format=plan.format,
        )
    formats = sorted({p.format for p in plans.values()})
    fmt = formats[0] if len(formats) == 1 else ("mixed-precision" if formats else "dense")
    return QuantizationConfig(
        config_groups=config_groups,
        format=fmt,
        quantization_status="compressed",
        kv_cache_scheme=QuantizationArgs(**kv) if kv else None,
        ignore=ignore,
    )


def _notes(
    model: nn.Module, plans: dict[str, LayerPlan], ignore: list[str], kv: dict[str, Any] | None, dtype: torch.dtype
) -> list[str]:
    formats = sorted({p.format for p in plans.values()})
    n_groups = len({p.key() for p in plans.values()})
    notes = [f"{len(plans)} linears in {n_groups} config group(s) ({', '.join(formats) or 'none'}); "]
    notes[0] += f"kept in float: {', '.join(ignore) or 'none'}"
    model_dtype = getattr(model, "dtype", dtype)
    if dtype not in (model_dtype, torch.float32):  # float32 holds float16 and bfloat16 exactly
        notes.append(f"float tensors (embeddings, norms, float linears) rounded from {model_dtype} to {dtype}")
    if any(p.format == "pack-quantized" and not p.weights["symmetric"] for p in plans.values()):
        notes.append(
            "asymmetric pack-quantized layers: vLLM reads their packed zero points; transformers 5 with "
            "compressed-tensors 0.20 cannot load them (it expects unpacked zero points; upstream bug)"
        )
    if kv is not None and kv["type"] == "int":
        notes.append("int8 KV cache: transformers reads it; vLLM's kv_cache_scheme takes FP8 only")
    ignored = kv_scheme_ignored_by_transformers(model) if kv is not None else ""
    if ignored:
        notes.append(ignored)
    for parts in FUSED:
        for name in plans:
            prefix, _, leaf = name.rpartition(".")
            siblings = [plans.get(f"{prefix}.{p}") for p in parts]
            if leaf == parts[0] and len({s.key() if s else None for s in siblings}) > 1:
                notes.append(f"{prefix}: {'/'.join(parts)} differ in scheme; vLLM fuses them and needs one scheme")
    return notes


EXPORTER = CompressedTensorsExporter()
