"""GPTQ and AWQ GEMM exports, read back by an independent unpacker written from the formats' docs.

gptqmodel needs a newer torch than this environment's and AutoAWQ needs triton/CUDA, so neither
reader can run here. The reader below follows the documented layouts bit by bit (a plain loop
over stream bits, unlike the exporter's vectorised byte packing) with the loaders' conventions:
GPTQ v1 adds 1 to the stored zero points, AWQ interleaves eight outputs per word as
[0, 2, 4, 6, 1, 3, 5, 7]. Weights must equal lowbit's dequantized weights exactly (fp16 scales),
and a transformers model rebuilt from the files must give lowbit's logits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import byte_tokenizer, tiny_gemma3, tiny_llama, tiny_qwen2, token_ids
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AwqConfig, GPTQConfig

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import export_checkpoint, export_model
from lowbit.export.gptq_packing import awq_pack_output_dim, gptq_pack_input_dim, gptq_pack_output_dim
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.qweight import quantize_weight
from lowbit.scheme import Override, QuantSpec, Recipe, Scheme, Step

BUILD = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble j of a word holds output 8c + AWQ_ORDER[j]


def _spec(fmt: str, group: int | None, sym: bool, scale_dtype: str = "float16") -> QuantSpec:
    gran = "group" if group else "channel"
    return QuantSpec(fmt, gran, group, symmetric=sym, scale_dtype=scale_dtype)


_CACHE: dict[str, nn.Module] = {}


def _quantized(arch: str, scheme: Scheme, steps: tuple[Step, ...] = (Step("rtn"),)) -> nn.Module:
    """A tiny model quantized with ``scheme``, made once per test session (tests copy before changing it)."""
    key = repr((arch, scheme, steps))
    if key not in _CACHE:
        model = BUILD[arch]()
        # the pipeline itself: refusal rows need grids (groups of 48 on 128 columns) that api.quantize refuses
        quantize_model(model, Recipe(scheme, steps), token_ids(4, 16), batch_size=4, progress=False)
        _CACHE[key] = model
    return _CACHE[key]


def _model(arch: str, spec: QuantSpec, **scheme: object) -> nn.Module:
    return _quantized(arch, Scheme(weights=spec, **scheme))  # type: ignore[arg-type]


# --- the independent reader -----------------------------------------------------------------------


def unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(W, M) int32 -> (n, M): value i of each column is stream bits [i*bits, (i+1)*bits), LSB first,
    stream bit k being bit k % 32 of word k // 32."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(n, w.shape[1], dtype=torch.int64)
    for i in range(n):
        for b in range(bits):
            k = i * bits + b
            out[i] |= ((w[k // 32] >> (k % 32)) & 1) << b
    return out


def unpack_awq(words: torch.Tensor, n_out: int) -> torch.Tensor:
    """(R, n_out/8) int32 -> (R, n_out) 4-bit values."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(w.shape[0], n_out, dtype=torch.int64)
    for o in range(n_out):
        nibble = AWQ_ORDER.index(o % 8)
        out[:, o] = (w[:, o // 8] >> (4 * nibble)) & 15
    return out


def gptq_weight(t: dict[str, torch.Tensor], name: str, bits: int, shape: torch.Size, v1: bool = True) -> torch.Tensor:
    out_f, in_f = shape
    q = unpack_stream(t[f"{name}.qweight"], bits, in_f)  # (in, out)
    zeros = unpack_stream(t[f"{name}.qzeros"].t(), bits, out_f).t()  # (G, out)
    if v1:
        zeros = zeros + 1
    g = t[f"{name}.g_idx"].long()
    scales = t[f"{name}.scales"]
    assert scales.dtype == torch.float16
    return ((q - zeros[g]).float() * scales.float()[g]).t()


def awq_weight(t: dict[str, torch.Tensor], name: str, group: int, shape: torch.Size) -> torch.Tensor:
    out_f, in_f = shape
    q = unpack_awq(t[f"{name}.qweight"], out_f)  # (in, out)
    zeros = unpack_awq(t[f"{name}.qzeros"], out_f)  # (G, out)
    g = torch.arange(in_f) // group
    return ((q - zeros[g]).float() * t[f"{name}.scales"].float()[g]).t()


def _export(model: nn.Module, fmt: str, out: Path, **options: str) -> tuple[dict, dict[str, torch.Tensor], list]:
    result = export_model(model, byte_tokenizer(), fmt, out, options)
    config = json.loads((out / "config.json").read_text())
    return config["quantization_config"], load_file(str(out / "model.safetensors")), result.notes


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.qweight is not None}


def _rebuilt(out: Path, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain transformers model from the exported config and files, quantized linears replaced by ``weights``."""
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    tensors = load_file(str(out / "model.safetensors"))
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in weights}
    state.update({f"{n}.weight": w for n, w in weights.items()})
    state.update({k: v for k, v in tensors.items() if k.endswith(".bias")})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return model


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_ids(2, 24, seed=5), use_cache=False).logits


def _check_float_tensors(model: nn.Module, t: dict[str, torch.Tensor]) -> None:
    quant = _quant_layers(model)
    for key, value in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if layer in quant or ".act." in key:
            continue
        if key in t:
            assert torch.equal(t[key], value), key
        else:  # a tied output head is stored once
            assert key == "lm_head.weight" and torch.equal(value, t["model.embed_tokens.weight"])


# --- the documented bit layouts, by hand ---------------------------------------------------------


def test_gptq_3bit_codes_cross_word_boundaries() -> None:
    codes = torch.zeros(1, 32, dtype=torch.int64)  # one output column, 32 input codes -> 3 words
    codes[0, 10], codes[0, 21], codes[0, 31] = 5, 7, 6
    words = gptq_pack_input_dim(codes, 3)[:, 0].tolist()
    # code 10 = 0b101: bits 30..31 of word 0 (0b01), bit 0 of word 1; code 21: bit 31 of word 1,
    # bits 0..1 of word 2; code 31: bits 29..31 of word 2
    assert words == [1 << 30, 1 | -(2**31), 0b11 | -(2**31) | (1 << 30)]


def test_gptq_4bit_and_awq_word_order() -> None:
    vals = torch.arange(8, dtype=torch.int64)[None, :]  # (1, 8)
    assert gptq_pack_input_dim(vals, 4).tolist() == [[0x76543210]]  # along the input dimension
    assert gptq_pack_output_dim(vals.t(), 4).tolist() == [[0x76543210]]  # qzeros: along the output dimension
    assert awq_pack_output_dim(vals).tolist() == [[0x75316420]]  # AWQ: outputs 0,2,4,6,1,3,5,7 in nibbles 0..7
    assert gptq_pack_input_dim(torch.tensor([[255, 1, 0, 128]]), 8).tolist() == [[0x800001FF - 2**32]]


# --- GPTQ -----------------------------------------------------------------------------------------

GPTQ_CASES = [
    ("uint2", 32, False),
    ("uint3", 32, False),
    ("int3", 64, True),
    ("int4", 32, True),
    ("uint4", None, False),
    ("int8", None, True),
    ("uint8", 128, False),
]


@pytest.mark.parametrize(("fmt", "group", "sym"), GPTQ_CASES)
def test_gptq_weights_exact(fmt: str, group: int | None, sym: bool, tmp_path: Path) -> None:
    model = _model("llama", _spec(fmt, group, sym))
    qc, t, notes = _export(model, "gptq", tmp_path / "out")
    bits = int(fmt.removeprefix("u").removeprefix("int"))
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (bits, group or -1, sym, False)
    for name, m in _quant_layers(model).items():
        n_groups = m.in_features // group if group else 1
        assert t[f"{name}.qweight"].shape == (m.in_features * bits // 32, m.out_features)
        assert t[f"{name}.qzeros"].shape == (n_groups, m.out_features * bits // 32)
        assert t[f"{name}.scales"].shape == (n_groups, m.out_features)
        assert t[f"{name}.qweight"].dtype == t[f"{name}.g_idx"].dtype == torch.int32
        if sym:  # zero point 2**(bits-1), stored minus 1
            zeros = unpack_stream(t[f"{name}.qzeros"].t(), bits, m.out_features)
            assert torch.all(zeros == 2 ** (bits - 1) - 1)
        assert torch.equal(gptq_weight(t, name, bits, m.weight.shape), m.weight), name
    _check_float_tensors(model, t)
    assert notes == ["1 linear layer(s) kept in float: lm_head"]


def test_gptq_act_order_g_idx(tmp_path: Path) -> None:
    steps = (Step("gptq", {"act_order": True, "static_groups": False}),)
    model = _quantized("llama", Scheme(weights=_spec("uint4", 32, False)), steps)
    qc, t, notes = _export(model, "gptq", tmp_path / "out")
    assert qc["desc_act"] is True and any("desc_act" in n for n in notes)
    reordered = 0
    for name, m in _quant_layers(model).items():
        assert m.qweight is not None
        assert torch.equal(t[f"{name}.g_idx"].long(), m.qweight.g_idx)
        reordered += not torch.equal(m.qweight.g_idx, torch.arange(m.in_features) // 32)
        assert torch.equal(gptq_weight(t, name, 4, m.weight.shape), m.weight), name
    assert reordered > 0


@pytest.mark.parametrize(("arch", "fmt"), [("llama", "gptq"), ("qwen2", "gptq"), ("gemma3", "awq"), ("qwen2", "awq")])
def test_logits_of_the_unpacked_files_match(arch: str, fmt: str, tmp_path: Path) -> None:
    model = _model(arch, _spec("uint4", 32, False))
    out = tmp_path / "out"
    _, t, _ = _export(model, fmt, out)
    unpack = {
        n: gptq_weight(t, n, 4, m.weight.shape) if fmt == "gptq" else awq_weight(t, n, 32, m.weight.shape)
        for n, m in _quant_layers(model).items()
    }
    torch.testing.assert_close(_logits(_rebuilt(out, unpack)), _logits(model), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_export_from_a_saved_checkpoint(tmp_path: Path) -> None:
    model = tiny_llama()
    report = api.quantize(model, Recipe(Scheme(weights=_spec("int4", 32, True))), token_ids(4, 16), progress=False)
    api.save_quantized(model, byte_tokenizer(), tmp_path / "ckpt", report)
    result = export_checkpoint(tmp_path / "ckpt", "gptq", tmp_path / "gptq")
    assert result.files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    t = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, m in _quant_layers(model).items():
        assert torch.equal(gptq_weight(t, name, 4, m.weight.shape), m.weight), name


def test_gptq_v2_holds_zero_point_zero(tmp_path: Path) -> None:
    model = copy.deepcopy(_model("llama", _spec("uint4", 32, False)))
    name = "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(name)
    qw = quantize_weight(layer.weight.abs(), _spec("uint4", 32, False))  # non-negative: every zero point is 0
    assert torch.all(qw.zero_point == 0)
    model.get_submodule("model.layers.0.mlp").up_proj = QuantLinear(qw, None)
    with pytest.raises(LowbitError, match=rf"zero point: .*checkpoint_format=gptq_v2.*{name}"):
        export_model(model, None, "gptq", tmp_path / "v1")
    assert not (tmp_path / "v1").exists()
    qc, t, _ = _export(model, "gptq", tmp_path / "v2", checkpoint_format="gptq_v2")
    assert qc["checkpoint_format"] == "gptq_v2"
    for lname, m in _quant_layers(model).items():
        assert torch.equal(gptq_weight(t, lname, 4, m.weight.shape, v1=False), m.weight), lname


def test_gptq_float32_scales_are_converted_with_a_note(tmp_path: Path) -> None:
    model = _model("llama", _spec("int4", 32, True, scale_dtype="float32"))
    _, t, notes = _export(model, "gptq", tmp_path / "out")
    worst = 0.0
    for name, m in _quant_layers(model).items():
        w = gptq_weight(t, name, 4, m.weight.shape)
        nz = m.weight != 0
        worst = max(worst, float(((w - m.weight).abs()[nz] / m.weight.abs()[nz]).max()))
    assert 0 < worst < 1e-3
    (note,) = [n for n in notes if "float16" in n]
    assert f"{worst:.2e}" in note and "14 layer(s)" in note


def test_gptq_per_tensor_is_one_scale_per_channel(tmp_path: Path) -> None:
    model = _model("llama", QuantSpec("int8", "tensor", None, scale_dtype="float16"))
    qc, t, _ = _export(model, "gptq", tmp_path / "out")
    assert qc["group_size"] == -1
    for name, m in _quant_layers(model).items():
        assert t[f"{name}.scales"].shape == (1, m.out_features)
        assert torch.equal(gptq_weight(t, name, 8, m.weight.shape), m.weight)


def test_float_layers_inside_blocks(tmp_path: Path) -> None:
    model = _model("llama", _spec("uint4", 32, False), ignore=("lm_head", "mlp.down_proj"))
    qc, t, notes = _export(model, "gptq", tmp_path / "gptq")
    assert qc["modules_in_block_to_quantize"] == [
        ["mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    ]
    assert "model.layers.1.mlp.down_proj.weight" in t and "model.layers.1.mlp.down_proj.qweight" not in t
    assert "3 linear layer(s) kept in float" in notes[0]
    assert GPTQConfig.from_dict(dict(qc, modules_in_block_to_quantize=None)).bits == 4
    qc, t, _ = _export(model, "awq", tmp_path / "awq")
    floats = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert sorted(qc["modules_to_not_convert"]) == floats
    # a float layer in one block only: GPTQ's one set for every block cannot say it, AWQ's list can
    model = _model("llama", _spec("uint4", 32, False), ignore=("lm_head", r"re:model\.layers\.0\.mlp\.down_proj"))
    with pytest.raises(LowbitError, match="layers kept in float: the decoder blocks quantize different linears"):
        export_model(model, None, "gptq", tmp_path / "gptq2")
    qc, _, _ = _export(model, "awq", tmp_path / "awq2")
    assert qc["modules_to_not_convert"] == ["model.layers.0.mlp.down_proj", "lm_head"]


def test_transformers_reads_the_quantization_configs(tmp_path: Path) -> None:
    model = _model("llama", _spec("uint4", 32, False))
    gptq = GPTQConfig.from_dict(_export(model, "gptq", tmp_path / "g")[0])
    assert (gptq.bits, gptq.group_size, gptq.sym, gptq.desc_act, gptq.format) == (4, 32, False, False, "gptq")
    awq = AwqConfig.from_dict(_export(model, "awq", tmp_path / "a")[0])
    assert (awq.bits, awq.group_size, awq.zero_point, awq.format, awq.modules_to_not_convert) == (
        4,
        32,
        True,
        "gemm",
        ["lm_head"],
    )


# --- AWQ ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "sym"), [("uint4", False), ("int4", True), ("uint4", True)])
def test_awq_weights_exact(fmt: str, sym: bool, tmp_path: Path) -> None:
    model = _model("llama", _spec(fmt, 32, sym))
    qc, t, _ = _export(model, "awq", tmp_path / "out")
    assert qc == {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": 32,
        "zero_point": True,
        "modules_to_not_convert": ["lm_head"],
    }
    for name, m in _quant_layers(model).items():
        assert t[f"{name}.qweight"].shape == (m.in_features, m.out_features // 8)
        assert t[f"{name}.qzeros"].shape == (m.in_features // 32, m.out_features // 8)
        assert f"{name}.g_idx" not in t
        if sym:  # symmetric 4-bit: zero point 8 in every nibble
            assert torch.all(t[f"{name}.qzeros"] == torch.tensor(0x88888888 - 2**32, dtype=torch.int32))
        assert torch.equal(awq_weight(t, name, 32, m.weight.shape), m.weight), name
    _check_float_tensors(model, t)


# --- refusals -------------------------------------------------------------------------------------


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return model


def _with_owq_columns(model: nn.Module) -> nn.Module:
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    idx = torch.tensor([3, 7])
    qw = dataclasses.replace(m.qweight, outlier_idx=idx, outlier_weight=torch.zeros(m.out_features, 2).half())
    return _replace(model, "model.layers.0.self_attn.q_proj", QuantLinear(qw, None))


def _odd_shape(model: nn.Module) -> nn.Module:
    qw = quantize_weight(torch.randn(252, 128), _spec("uint4", 32, False))
    return _replace(model, "model.layers.1.mlp.gate_proj", QuantLinear(qw, None))


def _quantized_head(model: nn.Module) -> nn.Module:
    """lowbit quantizes linears inside the blocks only; a hand-made model may still have a quantized head."""
    head = model.get_submodule("lm_head")
    return _replace(model, "lm_head", QuantLinear(quantize_weight(head.weight, _spec("uint4", 32, False)), None))


def _huge_scale(model: nn.Module) -> nn.Module:
    m = model.get_submodule("model.layers.0.mlp.up_proj")
    spec = dataclasses.replace(m.qweight.spec, scale_dtype="float32")
    qw = dataclasses.replace(m.qweight, scale=m.qweight.scale.float() * 1e8, spec=spec)
    return _replace(model, "model.layers.0.mlp.up_proj", QuantLinear(qw, None))


U4 = _spec("uint4", 32, False)
Q = "model.layers.0.self_attn.q_proj"  # the first layer: shown whenever all layers have the problem
DOWN = "model.layers.0.mlp.down_proj"
REFUSALS = [
    ("both", lambda: _model("llama", QuantSpec("fp8_e4m3", "channel", None)), "weights format", Q),
    ("both", lambda: _model("llama", U4, input_activations=QuantSpec("int8", "token", None, dynamic=True)),
     "input activations", Q),
    ("both", lambda: _model("llama", U4, kv_cache=QuantSpec("int8", "token", None, dynamic=True)), "KV cache",
     "kv_cache"),
    ("both", lambda: _with_owq_columns(_model("llama", U4)), "float columns", "model.layers.0.self_attn.q_proj"),
    ("both", lambda: _model("llama", _spec("uint4", 48, False)), "group size", Q),
    ("both", lambda: _model("llama", _spec("uint5", 32, False)), "bits", Q),
    ("awq", lambda: _model("llama", _spec("uint8", 32, False)), "bits", Q),
    ("both", lambda: _odd_shape(_model("llama", U4)), "shape", "model.layers.1.mlp.gate_proj"),
    ("both", lambda: _quantized_head(_model("llama", U4)), "placement", "lm_head"),
    ("both", lambda: _model("llama", U4, overrides=(Override("mlp.down_proj", _spec("uint4", 64, False), None),)),
     "group size", DOWN),
    ("gptq", lambda: _model("llama", U4, overrides=(Override("mlp.down_proj", _spec("uint8", 32, False), None),)),
     "bits", DOWN),
    ("awq", lambda: _model("llama", _spec("uint4", None, False)), "granularity", Q),
    ("awq", lambda: _quantized("llama", Scheme(weights=U4), (Step("gptq", {"static_groups": False}),)),
     "group order", Q),
    ("both", lambda: _huge_scale(_model("llama", U4)), "scale", "model.layers.0.mlp.up_proj"),
]  # fmt: skip


@pytest.mark.parametrize(("fmts", "make", "prop", "layer"), REFUSALS)
def test_refusals_name_layer_and_property(
    fmts: str, make: Callable[[], nn.Module], prop: str, layer: str, tmp_path: Path
) -> None:
    model = make()
    for fmt in ("gptq", "awq") if fmts == "both" else (fmts,):
        out = tmp_path / fmt
        with pytest.raises(LowbitError, match=f"cannot export to {fmt}") as info:
            export_model(model, None, fmt, out)
        lines = [x for x in str(info.value).splitlines() if x.strip().startswith(f"- {prop}:")]
        assert any(layer in x for x in lines), str(info.value)
        assert not out.exists()


def test_unknown_checkpoint_format(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="checkpoint_format 'v3' is not gptq or gptq_v2"):
        export_model(_model("llama", U4), None, "gptq", tmp_path / "o", {"checkpoint_format": "v3"})
    assert not (tmp_path / "o").exists()
