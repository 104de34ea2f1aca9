"""ONNX export: onnxruntime's logits against transformers' (float) and lowbit's (quantized) models.

Weight-only layers (MatMulNBits) hold lowbit's codes exactly, so their logits agree to float
accumulation order (atol 2e-5 on logits of magnitude ~1). Quantized activations are rounded by
onnxruntime from inputs that differ in the last bits, so a value at a rounding boundary may go
the other way: those models must agree far better than the quantization error itself.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from tiny_models import SHAPE, byte_tokenizer, tiny_gemma3, tiny_llama, tiny_qwen2, token_ids
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lowbit.errors import LowbitError
from lowbit.export import export_model
from lowbit.export.onnx_builder import FLOAT, GraphBuilder, value_info
from lowbit.export.onnx_linear import lower_linear, nbits_block, pack_bits
from lowbit.export.onnx_runtime import OnnxLM
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset
from lowbit.qweight import QuantizedWeight, quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

N_LINEARS = 7 * SHAPE["num_hidden_layers"]  # q, k, v, o, gate, up, down per layer
IDS = token_ids(2, 12, seed=3)
EXACT = 2e-5


def _recipe(weights: QuantSpec | None, acts: QuantSpec | None = None, steps: tuple[Step, ...] = (Step("rtn"),)):
    return Recipe(Scheme(weights=weights, input_activations=acts), steps)


def _quantized(model: nn.Module, recipe: Recipe) -> nn.Module:
    quantize_model(model, recipe, token_ids(4, 16, seed=1), batch_size=4, progress=False)
    return model


def _export(model: nn.Module, out: Path, options: dict[str, str] | None = None) -> OnnxLM:
    export_model(model, byte_tokenizer(), "onnx", out, options)
    return OnnxLM(out, threads=1)


@torch.no_grad()
def _reference(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _ops(out: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _seeded(cls: Any, config_cls: Any, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return cls(config_cls(**SHAPE, **kwargs)).float().eval()


FLOAT_MODELS = {
    "llama-tied": lambda: tiny_llama(tie=True),
    "qwen2": lambda: tiny_qwen2(),
    "qwen3": lambda: _seeded(Qwen3ForCausalLM, Qwen3Config),
    "mistral-window8": lambda: _seeded(MistralForCausalLM, MistralConfig, sliding_window=8),
    "llama3-rope": lambda: _seeded(
        LlamaForCausalLM,
        LlamaConfig,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "yarn-rope": lambda: _seeded(
        LlamaForCausalLM,
        LlamaConfig,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.mark.parametrize("arch", FLOAT_MODELS)
def test_float_model_matches_transformers(arch: str, tmp_path: Path) -> None:
    model = FLOAT_MODELS[arch]()
    ids = token_ids(2, 20, seed=3)  # longer than the mistral window
    lm = _export(model, tmp_path / "onnx")
    logits, past = lm(ids)
    assert logits.shape == (2, 20, SHAPE["vocab_size"]) and logits.dtype == torch.float32
    assert _max_diff(logits, _reference(model, ids)) < EXACT
    assert past.length == 20
    ops = _ops(tmp_path / "onnx")
    assert ops["MatMulNBits"] == 0 and ops["QuantizeLinear"] == 0


def test_output_files_and_tied_embedding_stored_once(tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    _export(tiny_llama(tie=True), out)
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "onnx_io.json", "config.json", "tokenizer.json"} <= names
    io = json.loads((out / "onnx_io.json").read_text())
    assert io["inputs"][:3] == ["input_ids", "past_key.0", "past_value.0"]
    assert io["outputs"][:3] == ["logits", "present_key.0", "present_value.0"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]  # the LM head reads the embedding (transB)
    (embed,) = [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    assert gemm.input[1] == embed.input[0]
    assert not [t.name for t in graph.initializer if "lm_head" in t.name]
    onnx.checker.check_model(str(out / "model.onnx"))


@pytest.mark.parametrize("quantized", [False, True])
def test_kv_cache_steps_equal_full_sequence(quantized: bool, tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    if quantized:
        _quantized(model, _recipe(QuantSpec("uint4", "group", 32, symmetric=False)))
    lm = _export(model, tmp_path / "onnx")
    full, _ = lm(IDS)
    assert _max_diff(full, _reference(model)) < EXACT
    parts, past = [], None
    for start, end in ((0, 4), (4, 7), *((j, j + 1) for j in range(7, 12))):  # prefill, a chunk after it, steps
        logits, past = lm(IDS[:, start:end], past)
        parts.append(logits)
    assert past is not None and past.length == 12
    assert _max_diff(torch.cat(parts, dim=1), full) < 1e-5


def test_generate_matches_transformers_greedy(tmp_path: Path) -> None:
    model = tiny_qwen2()
    lm = _export(model, tmp_path / "onnx")
    prompt = IDS[:, :5]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.generate(prompt, 8), expected)
    assert torch.equal(lm.generate(prompt, 0), prompt)


WEIGHT_ONLY = {
    "int4-g32-sym": (QuantSpec("int4", "group", 32), 4),
    "int4-g128-sym": (QuantSpec("int4", "group", 128), 4),
    "uint4-g32-asym": (QuantSpec("uint4", "group", 32, symmetric=False), 4),
    "uint4-g128-asym-fp16": (QuantSpec("uint4", "group", 128, symmetric=False, scale_dtype="float16"), 4),
    "uint3-g64-asym": (QuantSpec("uint3", "group", 64, symmetric=False), 4),
    "int2-g16": (QuantSpec("int2", "group", 16), 2),
    "int8-channel": (QuantSpec("int8", "channel", None), 8),
    "uint4-group48": (QuantSpec("uint4", "group", 48, symmetric=False), 4),  # blocks of 16
}


@pytest.mark.parametrize("case", WEIGHT_ONLY)
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_weight_only_is_matmulnbits_with_exact_codes(case: str, build: Any, tmp_path: Path) -> None:
    spec, bits = WEIGHT_ONLY[case]
    model = _quantized(build(), _recipe(spec))
    lm = _export(model, tmp_path / "onnx")
    assert _max_diff(lm(IDS)[0], _reference(model)) < EXACT
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == N_LINEARS
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
    has_zero_points = {len(n.input) > 3 and n.input[3] != "" for n in nbits}
    assert has_zero_points == {not spec.symmetric}
    assert _ops(tmp_path / "onnx")["QuantizeLinear"] == 0


def test_act_order_and_float_columns(tmp_path: Path) -> None:
    act_order = _recipe(QuantSpec("uint4", "group", 32, symmetric=False), None, (Step("gptq", {"act_order": True}),))
    model = _quantized(tiny_qwen2(), act_order)
    assert any(not torch.equal(m.qweight.g_idx, m.qweight.g_idx.sort().values)
               for m in model.modules() if isinstance(m, QuantLinear) and m.qweight is not None)  # fmt: skip
    lm = _export(model, tmp_path / "act_order")
    assert _max_diff(lm(IDS)[0], _reference(model)) < EXACT
    assert _ops(tmp_path / "act_order")["Gather"] > 1  # inputs gathered into group order

    owq = _quantized(tiny_llama(), get_preset("w4a16-owq"))
    assert any(m.qweight.n_outlier_columns for m in owq.modules() if isinstance(m, QuantLinear) and m.qweight)
    lm = _export(owq, tmp_path / "owq")
    assert _max_diff(lm(IDS)[0], _reference(owq)) < EXACT
    assert _ops(tmp_path / "owq")["MatMul"] > _ops(tmp_path / "act_order")["MatMul"]  # float-column matmuls


def _linear_case(in_features: int, spec: QuantSpec, permute: bool) -> QuantLinear:
    torch.manual_seed(0)
    w = torch.randn(24, in_features)
    qw = quantize_weight(w, spec)
    if permute:  # act-order layout: the columns of each group scattered
        perm = torch.randperm(in_features)
        qw = QuantizedWeight(qw.codes[:, perm], qw.scale, qw.zero_point, qw.g_idx[perm], spec)
    return QuantLinear(qw, torch.randn(24))


@pytest.mark.parametrize("in_features", [200, 96])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("fmt", ["int4", "uint4", "int8", "uint2"])
def test_one_layer_matmulnbits(in_features: int, permute: bool, fmt: str) -> None:
    """Last groups shorter than the rest, scattered groups: every code lands in its block."""
    import onnxruntime as ort

    spec = QuantSpec(fmt, "group", 32, symmetric=fmt.startswith("int"))
    layer = _linear_case(in_features, spec, permute)
    g = GraphBuilder()
    y = lower_linear(g, "x", "layer", layer)
    proto = g.model([value_info("x", FLOAT, [None, None, in_features])], [value_info(y, FLOAT, [None, None, 24])])
    x = torch.randn(2, 3, in_features)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    # outputs up to ~30: fp32 accumulation order differs by ~1e-5; one misplaced code by a scale (>1e-2)
    assert np.abs(got[0] - F.linear(x, layer.weight, layer.bias).numpy()).max() < 1e-4


def test_packing_and_block_choice() -> None:
    assert pack_bits(np.array([[1, 2, 15, 0]]), 4).tolist() == [[1 | 2 << 4, 15]]
    assert pack_bits(np.array([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert nbits_block(np.arange(576) // 128) == 128  # the demo model's 576 inputs: last group of 64
    assert nbits_block(np.arange(256) // 48) == 16
    assert nbits_block(np.zeros(100, np.int64)) == 128  # per channel
    assert nbits_block(np.arange(128) // 24) is None


W8A8 = {
    "static-int8": (QuantSpec("int8", "channel", None), QuantSpec("int8", "tensor", None)),
    "static-uint8-asym": (QuantSpec("int8", "channel", None), QuantSpec("uint8", "tensor", None, symmetric=False)),
    "dynamic-int8": (QuantSpec("int8", "channel", None), QuantSpec("int8", "token", None, dynamic=True)),
    "dynamic-uint8-asym-fp16": (
        QuantSpec("int8", "channel", None),
        QuantSpec("uint8", "token", None, symmetric=False, dynamic=True, scale_dtype="float16"),
    ),
    "w4a8-dynamic": (QuantSpec("int4", "group", 32), QuantSpec("int8", "token", None, dynamic=True)),
}


@pytest.mark.parametrize("case", W8A8)
def test_quantized_activations_are_qdq(case: str, tmp_path: Path) -> None:
    weights, acts = W8A8[case]
    float_logits = _reference(tiny_qwen2())
    model = _quantized(tiny_qwen2(), _recipe(weights, acts))
    expected = _reference(model)
    lm = _export(model, tmp_path / "onnx")
    diff = _max_diff(lm(IDS)[0], expected)
    assert diff < 5e-3 and diff < 0.1 * _max_diff(float_logits, expected), diff
    ops = _ops(tmp_path / "onnx")
    assert ops["QuantizeLinear"] == 4 * SHAPE["num_hidden_layers"]  # q/k/v and gate/up share their input's
    if not acts.dynamic and weights.bits == 8:  # QDQ weights (uint8) too
        assert ops["DequantizeLinear"] == ops["QuantizeLinear"] + N_LINEARS and ops["MatMulNBits"] == 0
    else:
        assert ops["DequantizeLinear"] == ops["QuantizeLinear"] and ops["MatMulNBits"] == N_LINEARS


@pytest.mark.parametrize("case", W8A8)
def test_each_layer_reproduces_its_module_on_its_onnx_input(case: str, tmp_path: Path) -> None:
    """Layer by layer on onnxruntime's own inputs: exact where logits of deep models cannot be.

    Per-token rounding makes a model's logits jump with its float rounding (see OnnxLM.linear_io),
    so each layer is checked on the very input onnxruntime gave it; many tokens, two batch rows.
    """
    weights, acts = W8A8[case]
    model = _quantized(tiny_llama(), _recipe(weights, acts))
    lm = _export(model, tmp_path / "onnx")
    seen = lm.linear_io(token_ids(2, 37, seed=5))
    assert set(seen) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} | {"lm_head"}
    with torch.no_grad():
        for name, (x, y) in seen.items():
            assert x.shape[:2] == y.shape[:2] == (2, 37), name
            want = model.get_submodule(name)(x)
            assert _max_diff(y, want) < 1e-5 * want.abs().max().item(), name


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576)])
def test_one_layer_w8a8_dynamic_many_tokens(shape: tuple[int, int]) -> None:
    """The demo model's widths, tokens of very different ranges: one scale per token, exactly."""
    import onnxruntime as ort

    k, n = shape
    torch.manual_seed(0)
    layer = QuantLinear(quantize_weight(0.05 * torch.randn(n, k), QuantSpec("int8", "channel", None)), None)
    layer.act = ActQuantizer(QuantSpec("int8", "token", None, dynamic=True))
    g = GraphBuilder()
    y = lower_linear(g, "x", "layer", layer)
    proto = g.model([value_info("x", FLOAT, [None, None, k])], [value_info(y, FLOAT, [None, None, n])])
    x = torch.randn(3, 17, k) * torch.logspace(-2, 2, 17).reshape(1, 17, 1)  # token ranges 0.01 .. 100
    x[:, 5, 7] = 500.0  # an outlier that sets one token's scale
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    with torch.no_grad():
        want = layer(x)
    rel = (torch.from_numpy(got) - want).abs().amax(-1) / want.abs().amax(-1)  # per token
    assert rel.max().item() < 1e-5


REFUSED = {
    "fp8": (lambda: _recipe(QuantSpec("fp8_e4m3", "channel", None)), "weights format"),
    "group24": (lambda: _recipe(QuantSpec("int4", "group", 24)), "group size"),
    "int4-acts": (
        lambda: _recipe(QuantSpec("int8", "channel", None), QuantSpec("int4", "token", None, dynamic=True)),
        "input activations",
    ),
    "llm-int8": (
        lambda: _recipe(None, QuantSpec("int8", "token", None, dynamic=True, outlier_threshold=6.0)),
        "input activations",
    ),
    "kv-cache": (lambda: get_preset("kv8"), "KV-cache quantization"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_name_layer_and_property(case: str, tmp_path: Path) -> None:
    recipe, prop = REFUSED[case]
    model = _quantized(tiny_llama(), recipe())
    out = tmp_path / "onnx"
    with pytest.raises(LowbitError) as err:
        export_model(model, None, "onnx", out)
    message = str(err.value)
    assert prop in message
    assert ("kv_cache" if case == "kv-cache" else "model.layers.0.self_attn.q_proj") in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_architecture_and_options(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="architecture: 'gemma3_text'"):
        export_model(tiny_gemma3(), None, "onnx", tmp_path / "a")
    with pytest.raises(LowbitError, match="accuracy_level must be one of"):
        export_model(tiny_llama(), None, "onnx", tmp_path / "b", {"accuracy_level": "9"})
    with pytest.raises(LowbitError, match="no option"):
        export_model(tiny_llama(), None, "onnx", tmp_path / "c", {"block_size": "32"})
    assert list(tmp_path.iterdir()) == []


def test_accuracy_level_reaches_matmulnbits(tmp_path: Path) -> None:
    model = _quantized(tiny_llama(), _recipe(QuantSpec("int4", "group", 32)))
    lm = _export(model, tmp_path / "onnx", {"accuracy_level": "4"})
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    assert _max_diff(lm(IDS)[0], _reference(model)) < 0.05  # int8 activations inside: close, not exact


def test_runner_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="no lowbit ONNX export"):
        OnnxLM(tmp_path)
    lm = _export(tiny_llama(), tmp_path / "onnx")
    _, past = lm(IDS)
    with pytest.raises(LowbitError, match="holds 2 sequences"):
        lm(IDS[:1, :1], past)
    with pytest.raises(LowbitError, match="batch, sequence"):
        lm(IDS[0])
    with pytest.raises(LowbitError, match="batch, sequence"):
        lm.linear_io(IDS[0])
    io = tmp_path / "onnx" / "onnx_io.json"
    io.write_text(json.dumps({k: v for k, v in json.loads(io.read_text()).items() if k != "linears"}))
    with pytest.raises(LowbitError, match="lists no linear layers"):
        OnnxLM(tmp_path / "onnx").linear_io(IDS)
