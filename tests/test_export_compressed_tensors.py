"""compressed-tensors export: files that compressed-tensors' own code decodes to lowbit's exact weights,
that transformers loads (decompressing on CPU) to lowbit's logits, and refusals that name layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from tiny_models import build, byte_tokenizer, tiny_llama, token_ids
from torch import nn
from transformers import AutoModelForCausalLM

from lowbit import api, checkpoint
from lowbit.errors import LowbitError
from lowbit.export import export_checkpoint, export_model
from lowbit.export.compressed_tensors import EXPORTER
from lowbit.formats import IntFormat
from lowbit.kvcache import KVQuantizer
from lowbit.modules import QuantLinear
from lowbit.packing import pack_int32_rows
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset
from lowbit.scheme import Override, QuantSpec, Recipe, Scheme, Step

INT4_G32 = QuantSpec("int4", "group", 32, scale_dtype="float16")
UINT4_G32_ASYM = QuantSpec("uint4", "group", 32, symmetric=False, scale_dtype="float16")
INT8_CH = QuantSpec("int8", "channel", None)
A8_TOKEN = QuantSpec("int8", "token", None, dynamic=True)
A8_STATIC = QuantSpec("int8", "tensor", None)
A8_STATIC_ASYM = QuantSpec("int8", "tensor", None, symmetric=False)
FP8_CH = QuantSpec("fp8_e4m3", "channel", None)

# name -> (scheme, expected quantization_config format)
CASES: dict[str, tuple[Scheme, str]] = {
    "int4-g32-sym": (Scheme(weights=INT4_G32), "pack-quantized"),
    "uint4-g32-asym": (Scheme(weights=UINT4_G32_ASYM), "pack-quantized"),
    "int8-channel": (Scheme(weights=INT8_CH), "pack-quantized"),
    "uint8-channel-asym": (Scheme(weights=QuantSpec("uint8", "channel", None, symmetric=False)), "pack-quantized"),
    "w8a8-dynamic-token": (Scheme(weights=INT8_CH, input_activations=A8_TOKEN), "int-quantized"),
    "w8a8-static-tensor": (Scheme(weights=INT8_CH, input_activations=A8_STATIC), "int-quantized"),
    "w8a8-static-asym": (Scheme(weights=INT8_CH, input_activations=A8_STATIC_ASYM), "int-quantized"),
    "w4a8-dynamic-token": (Scheme(weights=INT4_G32, input_activations=A8_TOKEN), "int-quantized"),
    "fp8-weights-only": (Scheme(weights=FP8_CH), "naive-quantized"),
    "w8a8-fp8": (get_preset("w8a8-fp8").scheme, "float-quantized"),
    "kv-int8-tensor": (Scheme(weights=INT4_G32, kv_cache=QuantSpec("int8", "tensor", None)), "pack-quantized"),
    "kv-fp8-head": (Scheme(weights=FP8_CH, kv_cache=QuantSpec("fp8_e4m3", "head", None)), "naive-quantized"),
    "mixed-int4-fp8": (
        Scheme(weights=INT4_G32, overrides=(Override("mlp.down_proj", FP8_CH, None),)),
        "mixed-precision",
    ),
}
# transformers 5 + compressed-tensors 0.20 expect unpacked zero points on load (an upstream bug);
# vLLM reads the packed ones llm-compressor writes, so these are checked with compressed-tensors' decompressor
NOT_LOADABLE_BY_TRANSFORMERS = {"uint4-g32-asym", "uint8-channel-asym"}


def _quantized(scheme: Scheme, arch: str = "llama", steps: tuple[Step, ...] = (Step("rtn"),)) -> nn.Module:
    model = build(arch)
    api.quantize(model, Recipe(scheme, steps), token_ids(4, 16, seed=1), batch_size=4, progress=False)
    return model


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_ids(2, 20, seed=11), use_cache=False).logits


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    err = float((actual - expected).abs().max())
    assert err <= 1e-4 * float(expected.abs().max()), err


KV_IGNORED = "will not apply kv_cache_scheme"


@torch.no_grad()
def _transformers_logits(model: nn.Module, notes: list[str], loaded: nn.Module) -> torch.Tensor:
    """lowbit's logits as transformers should reproduce them: with the KV cache in float when the
    export's notes say this transformers/compressed-tensors pair ignores kv_cache_scheme. The note
    is checked against what transformers did: KV scales on the loaded attention modules or not."""
    ignored = any(KV_IGNORED in n for n in notes)
    quantizers = [m for m in model.modules() if isinstance(m, KVQuantizer)]
    if quantizers:
        assert hasattr(loaded.get_submodule("model.layers.0.self_attn"), "k_scale") == (not ignored)
    for q in quantizers:
        q.enabled = not ignored
    try:
        return _logits(model)
    finally:
        for q in quantizers:
            q.enabled = True


def _quant_config(out: Path) -> dict[str, Any]:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def _linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _ct_weights(out: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight as compressed-tensors' own decompressor reads it from the files."""
    config = QuantizationConfig.model_validate(_quant_config(out))
    tensors = load_file(str(out / "model.safetensors"))
    weights = {}
    for scheme in config.config_groups.values():
        for name in names:
            if scheme.targets != ["Linear"] and name not in scheme.targets:
                continue
            local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
            weights[name] = BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)["weight"]
    assert sorted(weights) == sorted(names)
    return weights


@pytest.mark.parametrize("case", list(CASES))
def test_export_decodes_and_loads_to_the_same_model(case: str, tmp_path: Path) -> None:
    scheme, fmt = CASES[case]
    model = _quantized(scheme)
    out = tmp_path / "ct"
    result = export_model(model, byte_tokenizer(), "compressed-tensors", out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(result.files)
    qc = _quant_config(out)
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", fmt, "compressed")
    assert qc["ignore"] == ["lm_head"]
    linears = _linears(model)
    if fmt == "mixed-precision":  # one group per scheme, each naming its layers
        targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
        assert len(qc["config_groups"]) == 2 and targets == sorted(linears)
    else:
        assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]

    # compressed-tensors' decompressor gives lowbit's dequantized weights bit for bit
    for name, weight in _ct_weights(out, list(linears)).items():
        assert weight.dtype == torch.float32 and torch.equal(weight, linears[name].weight), name
    if case in NOT_LOADABLE_BY_TRANSFORMERS:
        assert any("cannot load them" in n for n in result.notes)
        return

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    expected = _transformers_logits(model, result.notes, loaded)
    _assert_close(_logits(loaded), expected)  # the first forward decompresses every layer
    for name, m in linears.items():
        assert torch.equal(loaded.get_submodule(name).weight, m.weight), name
    assert not torch.allclose(expected, _logits(build("llama")), atol=1e-3)  # quantization changed the model


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_biased_and_tied_architectures(arch: str, tmp_path: Path) -> None:
    """qwen2's q/k/v biases go with their quantized layers; gemma3's tied lm_head is stored once."""
    model = _quantized(Scheme(weights=INT4_G32, input_activations=A8_STATIC), arch)
    out = tmp_path / "ct"
    export_model(model, None, "compressed-tensors", out)
    stored = load_file(str(out / "model.safetensors"))
    assert ("model.layers.0.self_attn.q_proj.bias" in stored) == (arch == "qwen2")
    assert ("lm_head.weight" in stored) == (arch != "gemma3")
    _assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(model))


def test_fused_projections_with_different_schemes_get_a_note(tmp_path: Path) -> None:
    model = _quantized(Scheme(weights=INT4_G32, overrides=(Override("self_attn.k_proj", INT8_CH, None),)))
    result = export_model(model, None, "compressed-tensors", tmp_path / "ct")
    fused = [n for n in result.notes if "vLLM fuses" in n]
    assert [n.split(":")[0] for n in fused] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(3, 40), (5, 7), (2, 96)])
def test_pack_int32_is_compressed_tensors_layout(bits: int, shape: tuple[int, int]) -> None:
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=torch.Generator().manual_seed(bits))
    ours = pack_int32_rows(signed + 2 ** (bits - 1), bits)
    assert torch.equal(ours, pack_to_int32(signed.to(torch.int8), bits))


def test_exported_packing_matches_compressed_tensors(tmp_path: Path) -> None:
    model = _quantized(Scheme(weights=UINT4_G32_ASYM))
    out = tmp_path / "ct"
    export_model(model, None, "compressed-tensors", out)
    stored = load_file(str(out / "model.safetensors"))
    for name, m in _linears(model).items():
        qw = m.qweight
        assert qw is not None and isinstance(qw.spec.fmt, IntFormat) and qw.spec.fmt.qmin == 0
        codes = (qw.codes.to(torch.int16) - 8).to(torch.int8)  # compressed-tensors' signed grid
        zero_points = (qw.zero_point.to(torch.int16) - 8).to(torch.int8)
        assert torch.equal(stored[f"{name}.weight_packed"], pack_to_int32(codes, 4))
        assert torch.equal(stored[f"{name}.weight_zero_point"], pack_to_int32(zero_points, 4, packed_dim=0))
        assert torch.equal(stored[f"{name}.weight_shape"], torch.tensor([m.out_features, m.in_features]))


def test_mxfp4_exports_in_bfloat16(tmp_path: Path) -> None:
    model = _quantized(get_preset("mxfp4").scheme)
    out = tmp_path / "ct"
    export_model(model, None, "compressed-tensors", out, {"dtype": "bfloat16"})
    qc = _quant_config(out)
    assert qc["format"] == "mxfp4-pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["scale_dtype"] == "torch.uint8"
    linears = _linears(model)
    for name, weight in _ct_weights(out, list(linears)).items():  # fp4 values times 2**e: exact in bfloat16
        assert weight.dtype == torch.bfloat16 and torch.equal(weight.float(), linears[name].weight), name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    inv_freq = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
    model = model.to(torch.bfloat16)
    for n, b in inv_freq.items():  # as transformers loads bf16 models: RoPE frequencies stay float32
        module, _, attr = n.rpartition(".")
        setattr(model.get_submodule(module), attr, b)
    _assert_close(_logits(loaded).float(), _logits(model).float())


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_kv_cache_scales(granularity: str, tmp_path: Path) -> None:
    model = _quantized(Scheme(weights=INT8_CH, kv_cache=QuantSpec("int8", granularity, None)))
    out = tmp_path / "ct"
    result = export_model(model, None, "compressed-tensors", out)
    assert any("vLLM" in n and "KV" in n for n in result.notes)
    kv = _quant_config(out)["kv_cache_scheme"]
    assert (kv["type"], kv["num_bits"], kv["symmetric"], kv["dynamic"]) == ("int", 8, True, False)
    assert kv["strategy"] == {"tensor": "tensor", "head": "attn_head"}[granularity]
    stored = load_file(str(out / "model.safetensors"))
    quantizers = [m for m in model.modules() if isinstance(m, KVQuantizer)]
    for i, q in enumerate(quantizers):
        scale = stored[f"model.layers.{i}.self_attn.k_scale"]
        assert scale.shape == ((1,) if granularity == "tensor" else (2, 1, 1))
        assert torch.equal(scale.flatten(), q.qparams["k"][0].flatten())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    _assert_close(_logits(loaded), _transformers_logits(model, result.notes, loaded))
    expected = _logits(model)
    for q in quantizers:
        q.enabled = False
    assert not torch.allclose(_logits(model), expected, atol=1e-4)  # the KV cache quantization matters


# name -> (recipe, a layer the refusal names, the property)
REFUSALS: dict[str, tuple[Recipe, str, str]] = {
    "act-order g_idx": (
        Recipe(Scheme(weights=INT4_G32), (Step("gptq", {"act_order": True, "static_groups": False}),)),
        "model.layers.0.self_attn.q_proj",
        "act-order g_idx",
    ),
    "mxfp4 in float32": (get_preset("mxfp4"), "model.layers.1.mlp.down_proj", "dtype"),
    "fp4 groups of 16": (
        Recipe(Scheme(weights=QuantSpec("fp4_e2m1", "group", 16, scale_dtype="pow2"))),
        "model.layers.0.self_attn.k_proj",
        "group size",
    ),
    "fp4 float scales": (
        Recipe(Scheme(weights=QuantSpec("fp4_e2m1", "group", 32, scale_dtype="float16"))),
        "model.layers.0.mlp.gate_proj",
        "weights scale dtype",
    ),
    "fp8 e5m2": (
        Recipe(Scheme(weights=QuantSpec("fp8_e5m2", "channel", None))),
        "model.layers.1.mlp.up_proj",
        "weights format",
    ),
    "fp6": (get_preset("w6a16-fp6"), "model.layers.0.mlp.up_proj", "weights format"),
    "int3": (Recipe(Scheme(weights=QuantSpec("uint3", "group", 32, symmetric=False))), "model.layers.0", "format"),
    "owq": (get_preset("w4a16-owq"), "mlp.down_proj", "float columns"),
    "llm-int8": (get_preset("llm-int8"), "model.layers.0.mlp.gate_proj", "input activations"),
    "kv dynamic": (get_preset("kv8"), "kv_cache", "kv_cache granularity"),
    "partial group": (Recipe(Scheme(weights=QuantSpec("int4", "group", 48))), "mlp.down_proj", "group size"),
    "activations only": (
        Recipe(Scheme(weights=None, input_activations=A8_TOKEN)),
        "model.layers.0.self_attn.q_proj",
        "weights",
    ),
    "w8a8 asym weights": (
        Recipe(Scheme(weights=QuantSpec("int8", "channel", None, symmetric=False), input_activations=A8_TOKEN)),
        "model.layers.1.self_attn.v_proj",
        "weights symmetric",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_layer_and_property_and_write_nothing(case: str, tmp_path: Path) -> None:
    recipe, layer, prop = REFUSALS[case]
    model = build("llama")
    # the pipeline itself: the "partial group" row needs groups that api.quantize refuses
    quantize_model(model, recipe, token_ids(4, 16, seed=1), batch_size=4, progress=False)
    problems = [p for p in EXPORTER.check(model, {}) if prop in p.prop]
    assert any(layer in p.layer for p in problems), problems
    with pytest.raises(LowbitError, match="cannot export to compressed-tensors") as info:
        export_model(model, None, "compressed-tensors", tmp_path / "ct")
    assert f"{problems[0].prop}: " in str(info.value) and problems[0].layer in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_a_lowbit_checkpoint_exports_the_same_files(tmp_path: Path) -> None:
    model = _quantized(Scheme(weights=UINT4_G32_ASYM, kv_cache=QuantSpec("int8", "tensor", None)))
    export_model(model, None, "compressed-tensors", tmp_path / "direct")
    checkpoint.save_quantized(model, None, tmp_path / "lowbit", {})
    export_checkpoint(tmp_path / "lowbit", "compressed-tensors", tmp_path / "from-checkpoint")
    direct = load_file(str(tmp_path / "direct" / "model.safetensors"))
    again = load_file(str(tmp_path / "from-checkpoint" / "model.safetensors"))
    assert direct.keys() == again.keys()
    assert all(torch.equal(direct[k], again[k]) for k in direct)
    assert _quant_config(tmp_path / "direct") == _quant_config(tmp_path / "from-checkpoint")


def test_scales_the_file_dtype_cannot_hold_are_refused(tmp_path: Path) -> None:
    model = _quantized(Scheme(weights=INT4_G32))  # float16 scales
    with pytest.raises(LowbitError, match="weights scale dtype"):
        export_model(model, None, "compressed-tensors", tmp_path / "bf16", {"dtype": "bfloat16"})
    result = export_model(model, None, "compressed-tensors", tmp_path / "fp16", {"dtype": "float16"})
    assert any("rounded from torch.float32 to torch.float16" in n for n in result.notes)
    stored = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == torch.float16
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(LowbitError, match="dtype='fp8' is not one of"):
        export_model(model, None, "compressed-tensors", tmp_path / "x", {"dtype": "fp8"})


def test_a_bias_the_architecture_lacks_is_refused(tmp_path: Path) -> None:
    """OS+ shifts add biases to llama's bias-free linears: loaders would drop them."""
    model = _quantized(Scheme(weights=INT4_G32))
    name = "model.layers.1.mlp.down_proj"
    model.get_submodule(name).bias = torch.ones(128)
    with pytest.raises(LowbitError, match=f"bias: .*{name}"):
        export_model(model, None, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_unquantized_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="nothing is quantized"):
        export_model(tiny_llama(), None, "compressed-tensors", tmp_path / "ct")
