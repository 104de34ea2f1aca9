"""The layer-by-layer pipeline on tiny random Llama, Qwen2 and Gemma3 models.

The references are computed without the pipeline: weights quantized directly with
``quantize_weight``, activation ranges and post-RoPE keys captured with our own hooks on float
copies of the model. For blocks after the first, a "hybrid" model (the pipeline's quantized
blocks before block i, float blocks from i on) reproduces exactly what the pipeline saw when it
calibrated block i, so those checks cover the propagation between blocks and the keyword
arguments (masks, position embeddings) each block is given.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCH_NAMES, N_LAYERS, build, tiny_gpt2, tiny_llama, token_ids
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.kvcache import KVQuantizer, _kv_attention
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.pipeline import RunReport, quantize_model
from lowbit.presets import get_preset
from lowbit.primitives import per_token_fake_quantize, qparams
from lowbit.qweight import quantize_weight
from lowbit.scheme import Override, QuantSpec, Recipe, Scheme, Step

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TARGETS = [f"model.layers.{i}.{n}" for i in range(N_LAYERS) for n in LINEARS]
BATCH = 4
INT8 = get_format("int8")


def _calib() -> torch.Tensor:
    return token_ids(6, 24, seed=1)  # two batches of BATCH=4 and 2: uneven on purpose


def _quantize(model: nn.Module, recipe: Recipe) -> RunReport:
    return quantize_model(model, recipe, _calib(), batch_size=BATCH, progress=False, measure=True)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def _run_batches(model: nn.Module, calib: torch.Tensor) -> None:
    """Run ``model`` over ``calib`` split as the pipeline splits it."""
    for batch in calib.split(BATCH):
        model(input_ids=batch, use_cache=False)


@contextmanager
def _hooks(hooks: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _record_inputs(store: list[torch.Tensor]) -> Callable[..., None]:
    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
        store.append(inp[0].detach().clone())

    return hook


def _record_output(store: list[torch.Tensor]) -> Callable[..., None]:
    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        store.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    return hook


def _hybrid(float_model: nn.Module, quant_model: nn.Module, i: int) -> nn.Module:
    """Float model whose blocks before ``i`` are the pipeline's quantized blocks."""
    hybrid = copy.deepcopy(float_model)
    for j in range(i):
        hybrid.model.layers[j] = copy.deepcopy(quant_model.model.layers[j])
    return hybrid


# ---- which layers are replaced, and by what -------------------------------------------------------


@pytest.fixture(scope="module", params=ARCH_NAMES)
def w4_run(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module, RunReport]:
    arch = request.param
    float_model = build(arch)
    model = copy.deepcopy(float_model)
    report = _quantize(model, get_preset("w4a16-rtn"))
    return arch, float_model, model, report


def test_rtn_replaces_exactly_the_targets(w4_run: tuple[str, nn.Module, nn.Module, RunReport]) -> None:
    _, float_model, model, _ = w4_run
    spec = get_preset("w4a16-rtn").scheme.weights
    assert spec is not None
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(TARGETS)
    # everything else is untouched: lm_head, embeddings, norms
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert torch.equal(model.lm_head.weight, float_model.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    float_state = float_model.state_dict()
    for key, value in model.state_dict().items():
        if not any(key.startswith(t + ".") for t in TARGETS):
            assert torch.equal(value, float_state[key]), key
    for name in TARGETS:
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        assert module.act is None
        expected = quantize_weight(float_model.get_submodule(name).weight, spec)
        qw = module.qweight
        assert qw is not None
        assert qw.spec == spec
        assert qw.codes.dtype == expected.codes.dtype == torch.int8
        assert torch.equal(qw.codes, expected.codes), name
        assert torch.equal(qw.scale, expected.scale), name
        assert torch.equal(qw.zero_point, expected.zero_point), name
        assert torch.equal(qw.g_idx, expected.g_idx), name
        assert torch.equal(module.weight, expected.dequantize()), name
        assert int(qw.codes.min()) >= -8 and int(qw.codes.max()) <= 7


def test_report_has_one_entry_per_target_and_block(w4_run: tuple[str, nn.Module, nn.Module, RunReport]) -> None:
    _, _, _, report = w4_run
    assert [r.name for r in report.layers] == TARGETS
    for r in report.layers:
        assert r.weights == "int4 g128 sym mse fp16-scale" and r.activations == "float"
        assert torch.isfinite(torch.tensor(r.rel_error)) and 0 < r.rel_error < 0.1, r
        assert r.bits_per_weight > 4
    assert len(report.block_errors) == N_LAYERS
    assert all(0 < e < 1 for e in report.block_errors)
    assert (report.n_samples, report.seq_len) == tuple(_calib().shape)
    d = report.to_dict()
    assert d["calibration"] == {"samples": 6, "seq_len": 24} and len(d["layers"]) == len(TARGETS)


def test_pipeline_logits_match_direct_quantization(w4_run: tuple[str, nn.Module, nn.Module, RunReport]) -> None:
    _, float_model, model, _ = w4_run
    spec = get_preset("w4a16-rtn").scheme.weights
    assert spec is not None
    direct = copy.deepcopy(float_model)
    with torch.no_grad():
        for name in TARGETS:
            linear = direct.get_submodule(name)
            linear.weight.copy_(quantize_weight(linear.weight, spec).dequantize())
    ids = token_ids(3, 20, seed=7)
    got, want, ref = _logits(model, ids), _logits(direct, ids), _logits(float_model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ref, atol=1e-3)  # quantization did change the model


@torch.no_grad()
def test_layer_errors_match_a_direct_computation(w4_run: tuple[str, nn.Module, nn.Module, RunReport]) -> None:
    """Each layer's rel_error, recomputed from its inputs in a run of the quantized model (every
    block then sees the outputs of the quantized blocks before it, as in the pipeline)."""
    _, float_model, model, report = w4_run
    spec = get_preset("w4a16-rtn").scheme.weights
    assert spec is not None
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in TARGETS}
    with _hooks({model.get_submodule(n): _record_inputs(inputs[n]) for n in TARGETS}):
        _run_batches(model, _calib())
    by_name = {r.name: r.rel_error for r in report.layers}
    for name in TARGETS:
        w = float_model.get_submodule(name).weight
        wq = quantize_weight(w, spec).dequantize()
        num = sum(float((F.linear(x, wq) - F.linear(x, w)).double().pow(2).sum()) for x in inputs[name])
        den = sum(float(F.linear(x, w).double().pow(2).sum()) for x in inputs[name])
        assert by_name[name] == pytest.approx(num / den, rel=1e-5), name


@torch.no_grad()
def test_first_q_proj_error_from_float_copy(w4_run: tuple[str, nn.Module, nn.Module, RunReport]) -> None:
    """Block 0's q_proj reads the normed embeddings: its inputs come from the float model too."""
    _, float_model, _, report = w4_run
    spec = get_preset("w4a16-rtn").scheme.weights
    assert spec is not None
    copy_model = copy.deepcopy(float_model)
    q_proj = copy_model.model.layers[0].self_attn.q_proj
    xs: list[torch.Tensor] = []
    with _hooks({q_proj: _record_inputs(xs)}):
        _run_batches(copy_model, _calib())
    x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    assert x.shape == (6 * 24, 128)
    y = F.linear(x, q_proj.weight)
    yq = F.linear(x, quantize_weight(q_proj.weight, spec).dequantize())
    expected = float((yq - y).double().pow(2).sum() / y.double().pow(2).sum())
    assert report.layers[0].name == "model.layers.0.self_attn.q_proj"
    assert report.layers[0].rel_error == pytest.approx(expected, rel=1e-5)


def test_block_errors_match_a_direct_computation(w4_run: tuple[str, nn.Module, nn.Module, RunReport]) -> None:
    """block_errors[i]: quantized block i vs float block i, both on the quantized blocks' outputs."""
    _, float_model, model, report = w4_run
    for i in range(N_LAYERS):
        hybrid = _hybrid(float_model, model, i)
        outs: dict[str, list[torch.Tensor]] = {"q": [], "f": []}
        with _hooks(
            {model.model.layers[i]: _record_output(outs["q"]), hybrid.model.layers[i]: _record_output(outs["f"])}
        ):
            _run_batches(model, _calib())
            _run_batches(hybrid, _calib())
        num = sum(float((q - f).double().pow(2).sum()) for q, f in zip(outs["q"], outs["f"], strict=True))
        den = sum(float(f.double().pow(2).sum()) for f in outs["f"])
        assert report.block_errors[i] == pytest.approx(num / den, rel=1e-5), i


# ---- activation quantization ----------------------------------------------------------------------


def _rtn(preset: str) -> Recipe:
    """A preset's scheme with RTN alone (the activation presets smooth and run GPTQ first)."""
    return Recipe(get_preset(preset).scheme, (Step("rtn"),), f"{preset}-rtn")


def test_w8a8_dynamic_per_token() -> None:
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    report = _quantize(model, get_preset("w8a8"))
    assert all(r.activations == "int8 token sym dyn" for r in report.layers)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3))
    for name in TARGETS:
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and isinstance(module.act, ActQuantizer)
        assert module.act.scale is None  # nothing static
        qw = module.qweight
        assert qw is not None and qw.spec.format == "int8" and qw.spec.granularity == "channel"
        xi = x[..., : module.in_features]
        wdq = qw.dequantize()
        expected = F.linear(per_token_fake_quantize(xi, INT8, True, "float32"), wdq)
        out = module(xi)
        assert torch.equal(out, expected), name
        assert not torch.equal(out, F.linear(xi, wdq))  # the activations really are quantized
        # per-token: scaling one token does not change the others' results
        x2 = xi.clone()
        x2[0, 0] *= 100
        assert torch.equal(module(x2)[0, 1:], out[0, 1:])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_w8a8_static_scales_are_calibration_minmax(arch: str) -> None:
    float_model = build(arch)
    model = copy.deepcopy(float_model)
    _quantize(model, _rtn("w8a8-static"))
    for i in range(N_LAYERS):
        hybrid = _hybrid(float_model, model, i)
        names = [f"model.layers.{i}.{n}" for n in LINEARS]
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with _hooks({hybrid.get_submodule(n): _record_inputs(seen[n]) for n in names}):
            _run_batches(hybrid, _calib())
        for name in names:
            lo = torch.stack([x.min() for x in seen[name]]).min()
            hi = torch.stack([x.max() for x in seen[name]]).max()
            scale, zp = qparams(lo, hi, INT8, True)
            act = model.get_submodule(name).act
            assert act is not None and act.scale is not None and act.zero_point is not None
            assert float(act.scale) == pytest.approx(float(scale), rel=1e-6), name
            assert torch.equal(act.zero_point, zp) and float(zp) == 0.0
            assert float(scale) == pytest.approx(float(torch.maximum(-lo, hi)) / 127.5, rel=1e-6)


def test_w8a8_static_forward() -> None:
    model = tiny_llama()
    _quantize(model, _rtn("w8a8-static"))
    module = model.model.layers[1].mlp.down_proj
    assert isinstance(module, QuantLinear) and module.act is not None and module.qweight is not None
    scale = module.act.scale
    assert scale is not None
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 1000 * float(scale)  # saturates at 127 * scale
    xq = torch.clamp(torch.round(x / scale), -128, 127) * scale
    assert float(xq[0, 0]) == pytest.approx(127 * float(scale))
    assert torch.equal(module(x), F.linear(xq, module.qweight.dequantize()))


# ---- KV cache -------------------------------------------------------------------------------------

_CAPTURED: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """Records the (post-RoPE) keys and values attention reads, then runs lowbit's KV attention
    (which quantizes them if the module carries an enabled KV quantizer)."""
    _CAPTURED.append((module, key.detach().clone(), value.detach().clone()))
    return _kv_attention(module, query, key, value, *args, **kwargs)


def _fake_kv8_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """Our own int8 per-token KV fake quantization."""
    key = per_token_fake_quantize(key, INT8, True, "float32")
    value = per_token_fake_quantize(value, INT8, True, "float32")
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def _static_kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         *args: Any, **kwargs: Any) -> Any:  # fmt: skip
    """Symmetric int8 with the per-head scales (1, n_kv, 1, 1) in ``module.test_kv_scales``."""
    scales = module.test_kv_scales
    key = torch.clamp(torch.round(key / scales["k"]), -128, 127) * scales["k"]
    value = torch.clamp(torch.round(value / scales["v"]), -128, 127) * scales["v"]
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


_IMPLS = {"test_capture": _capture_attention, "test_fake_kv8": _fake_kv8_attention,
          "test_static_kv": _static_kv_attention}  # fmt: skip
for _name, _fn in _IMPLS.items():
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, sdpa_mask)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_kv8_dynamic(arch: str) -> None:
    float_model = build(arch)
    model = copy.deepcopy(float_model)
    report = _quantize(model, get_preset("kv8"))
    assert report.layers == []  # weights and activations stay float
    assert len(report.block_errors) == N_LAYERS and all(0 < e < 1e-2 for e in report.block_errors)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    kvqs = [layer.self_attn.lowbit_kv for layer in model.model.layers]
    assert all(isinstance(q, KVQuantizer) and q.enabled and not q.observing for q in kvqs)
    ids = token_ids(2, 20, seed=5)
    got, ref = _logits(model, ids), _logits(float_model, ids)
    diff = (got - ref).norm() / ref.norm()
    assert 0 < diff < 0.02
    reference = copy.deepcopy(float_model)
    reference.config._attn_implementation = "test_fake_kv8"
    torch.testing.assert_close(got, _logits(reference, ids), rtol=1e-5, atol=1e-5)


def _kv_head_recipe() -> Recipe:
    kv = QuantSpec("int8", "head", None, symmetric=True, observer="minmax")
    return Recipe(Scheme(kv_cache=kv), name="kv8-head")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_static_per_head_scales(arch: str) -> None:
    float_model = build(arch)
    model = copy.deepcopy(float_model)
    _quantize(model, _kv_head_recipe())
    kvqs = [layer.self_attn.lowbit_kv for layer in model.model.layers]
    for i in range(N_LAYERS):
        # what the pipeline saw for block i: blocks < i KV-quantized, block i in float
        probe = copy.deepcopy(model)
        for j, layer in enumerate(probe.model.layers):
            layer.self_attn.lowbit_kv.enabled = j < i
        probe.config._attn_implementation = "test_capture"
        _CAPTURED.clear()
        _run_batches(probe, _calib())
        attn = probe.model.layers[i].self_attn
        keys = [k for m, k, _ in _CAPTURED if m is attn]
        values = [v for m, _, v in _CAPTURED if m is attn]
        assert len(keys) == 2 and keys[0].shape == (BATCH, 2, 24, 32)
        for kind, xs in (("k", keys), ("v", values)):
            absmax = torch.stack([x.abs().amax(dim=(0, 2, 3)) for x in xs]).amax(0)  # per KV head
            scale, zp = kvqs[i].qparams[kind]
            assert scale.shape == (1, 2, 1, 1)
            torch.testing.assert_close(scale.flatten(), absmax / 127.5, rtol=1e-6, atol=0)
            assert torch.equal(zp, torch.zeros_like(zp))
            assert not torch.allclose(scale[0, 0], scale[0, 1])  # heads really differ
    # and the quantized model uses them: the same logits as our own per-head int8 fake quantization
    reference = copy.deepcopy(float_model)
    for ref_layer, kvq in zip(reference.model.layers, kvqs, strict=True):
        ref_layer.self_attn.test_kv_scales = {k: kvq.qparams[k][0].clone() for k in ("k", "v")}
    reference.config._attn_implementation = "test_static_kv"
    ids = token_ids(2, 20, seed=9)
    got = _logits(model, ids)
    torch.testing.assert_close(got, _logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _logits(float_model, ids), atol=1e-4)


# ---- errors ---------------------------------------------------------------------------------------

W4 = QuantSpec("int4", "group", 128)


def _raises(recipe: Recipe, *fragments: str, model: nn.Module | None = None) -> None:
    with pytest.raises(LowbitError) as info:
        _quantize(model if model is not None else tiny_llama(), recipe)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_unknown_architecture() -> None:
    _raises(get_preset("w4a16-rtn"), "'gpt2'", "GPT2LMHeadModel", "ARCHS", "llama", model=tiny_gpt2())


def test_weights_without_quantizer_step() -> None:
    _raises(Recipe(Scheme(weights=W4), steps=(), name="nosteps"), "'nosteps'", "no quantizer step")


def test_unknown_step() -> None:
    _raises(Recipe(Scheme(weights=W4), steps=(Step("rnt"),)), "unknown recipe step 'rnt'", "'rtn'")


def test_unknown_step_parameter() -> None:
    _raises(Recipe(Scheme(weights=W4), steps=(Step("rtn", {"bits": 4}),)), "'rtn'", "unknown parameter 'bits'")


def test_group_larger_than_dimension() -> None:
    recipe = Recipe(Scheme(weights=QuantSpec("int4", "group", 512)))
    _raises(recipe, "model.layers.0.self_attn.q_proj", "group_size 512", "128")


def test_nan_weight_names_the_layer() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    _raises(get_preset("w4a16-rtn"), "model.layers.1.mlp.up_proj", "NaN", model=model)


# ---- overrides and ignore -------------------------------------------------------------------------


def test_override_down_proj_to_int8_channel() -> None:
    w8 = QuantSpec("int8", "channel", None)
    scheme = Scheme(weights=W4, overrides=(Override("re:.*down_proj", w8, None),))
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    report = _quantize(model, Recipe(scheme))
    for name in TARGETS:
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and module.qweight is not None
        spec = w8 if name.endswith("down_proj") else W4
        qw = module.qweight
        assert qw.spec == spec, name
        expected = quantize_weight(float_model.get_submodule(name).weight, spec)
        assert torch.equal(qw.codes, expected.codes) and torch.equal(qw.scale, expected.scale)
        lo, hi = int(qw.codes.min()), int(qw.codes.max())
        if spec is w8:
            assert qw.scale.shape == (module.out_features, 1) and hi - lo > 15  # beyond int4's grid
        else:
            assert lo >= -8 and hi <= 7
    weights = {r.name: r.weights for r in report.layers}
    assert weights["model.layers.0.mlp.down_proj"] == "int8 channel sym"
    assert weights["model.layers.0.mlp.up_proj"] == "int4 g128 sym"


def test_ignore_leaves_linears_float() -> None:
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    report = _quantize(model, Recipe(Scheme(weights=W4, ignore=("lm_head", "mlp.down_proj"))))
    for name in TARGETS:
        module = model.get_submodule(name)
        if name.endswith("mlp.down_proj"):
            assert type(module) is nn.Linear
            assert torch.equal(module.weight, float_model.get_submodule(name).weight)
        else:
            assert isinstance(module, QuantLinear)
    assert len(report.layers) == len(TARGETS) - N_LAYERS
    assert not any(r.name.endswith("down_proj") for r in report.layers)


def test_activation_only_keeps_float_weights() -> None:
    a8 = QuantSpec("int8", "token", None, dynamic=True)
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    _quantize(model, Recipe(dataclasses.replace(get_preset("w8a8").scheme, weights=None, input_activations=a8)))
    module = model.model.layers[0].self_attn.o_proj
    assert isinstance(module, QuantLinear) and module.qweight is None and module.act is not None
    assert torch.equal(module.weight, float_model.model.layers[0].self_attn.o_proj.weight)


@torch.no_grad()
def test_layer_errors_stop_after_the_token_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget of one batch, each layer's error is that of the first calibration batch only."""
    import lowbit.stages

    monkeypatch.setattr(lowbit.stages, "ERROR_TOKENS", BATCH * 24)  # the first batch: 4 x 24 tokens
    float_model = tiny_llama()
    report = _quantize(copy.deepcopy(float_model), get_preset("w4a16-rtn"))
    spec = get_preset("w4a16-rtn").scheme.weights
    assert spec is not None
    q_proj = float_model.model.layers[0].self_attn.q_proj
    xs: list[torch.Tensor] = []
    with _hooks({q_proj: _record_inputs(xs)}):
        _run_batches(float_model, _calib())
    x = xs[0]  # the first batch alone
    y, yq = F.linear(x, q_proj.weight), F.linear(x, quantize_weight(q_proj.weight, spec).dequantize())
    expected = float((yq - y).double().pow(2).sum() / y.double().pow(2).sum())
    assert report.layers[0].rel_error == pytest.approx(expected, rel=1e-5)
    whole = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    y, yq = F.linear(whole, q_proj.weight), F.linear(whole, quantize_weight(q_proj.weight, spec).dequantize())
    assert report.layers[0].rel_error != pytest.approx(float((yq - y).pow(2).sum() / y.pow(2).sum()), rel=1e-5)
