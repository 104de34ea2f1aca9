"""ZeroQuant LKD on tiny random models: lower block error than RTN, RTN at zero steps, the
straight-through gradient, a block left exactly as found (also after an error), a quantized KV
cache and static activations in the student, the fallback to RTN, and parameter checks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCH_NAMES, block_context, build, tiny_llama, token_ids
from torch import nn

from lowbit.algorithms import BlockContext, build_algorithm
from lowbit.algorithms.zeroquant import ZeroQuant, _kv_straight_through, straight_through, weight_fake_quant
from lowbit.errors import LowbitError
from lowbit.kvcache import KVQuantizer
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.pipeline import RunReport, quantize_model
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 32, symmetric=True)
A8 = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)
W4A8 = Scheme(weights=W4, input_activations=A8)
BLOCK0 = "model.layers.0"


def _calib() -> torch.Tensor:
    return token_ids(8, 32, seed=1)


def _run(step: Step, scheme: Scheme = W4A8) -> RunReport:
    return quantize_model(
        tiny_llama(), Recipe(scheme, (step,), "x"), _calib(), batch_size=4, progress=False, measure=True
    )


def _block_ctx(model: nn.Module, scheme: Scheme = W4A8) -> BlockContext:
    """Block 0 of ``model`` as the pipeline hands it to a quantizer."""
    return block_context(model, scheme, _calib())


def _assert_untouched(block: nn.Module, before: dict[str, torch.Tensor], flags: dict[str, bool]) -> None:
    """Same tensors, same requires_grad flags, no gradients, no hooks, no instance-level forwards."""
    for name, p in block.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.requires_grad == flags[name], name
        assert p.grad is None, name
    for name, m in block.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert "forward" not in m.__dict__, name


def test_lkd_beats_rtn_in_the_pipeline() -> None:
    rtn = _run(Step("rtn"))
    lkd = _run(Step("zeroquant"))
    assert sum(lkd.block_errors) < 0.6 * sum(rtn.block_errors), (lkd.block_errors, rtn.block_errors)
    assert all(e < r for e, r in zip(lkd.block_errors, rtn.block_errors, strict=True))
    for layer in lkd.layers:
        assert layer.extra["lkd_loss_end"] < layer.extra["lkd_loss_start"], layer.name
        assert "lkd_reverted" not in layer.extra and layer.extra["lkd_seconds"] >= 0
    # several batches per step are averaged; it still improves on RTN
    two = _run(Step("zeroquant", {"steps": 10, "batch_size": 2}))
    assert sum(two.block_errors) < sum(rtn.block_errors)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_end_loss_is_the_loss_of_the_quantized_block(arch: str) -> None:
    """The last student is exactly the block the pipeline builds (Qwen2's biases included: they
    stay float in both): the block error (relative, on the same inputs) is lkd_loss_end divided
    by the mean square of the float outputs."""
    model = build(arch)
    ctx = _block_ctx(model)
    ref = torch.cat([o.flatten() for o in ctx.forward()]).double().pow(2).mean()
    report = quantize_model(
        model, Recipe(W4A8, (Step("zeroquant", {"steps": 5}),), "x"), _calib(), batch_size=4, progress=False
    )
    end = report.layers[0].extra["lkd_loss_end"]
    assert report.block_errors[0] == pytest.approx(end / float(ref), rel=1e-4)


def test_zero_steps_is_rtn() -> None:
    ctx = _block_ctx(tiny_llama())
    ZeroQuant(steps=0).apply(ctx)
    assert set(ctx.qweights) == set(ctx.targets)
    for name, lin in ctx.targets.items():
        expected = quantize_weight(lin.weight, W4)
        assert torch.equal(ctx.qweights[name].codes, expected.codes), name
        assert torch.equal(ctx.qweights[name].scale, expected.scale), name
        assert ctx.stats[name]["lkd_loss_end"] == ctx.stats[name]["lkd_loss_start"] > 0


def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64, requires_grad=True)
    y = straight_through(w, weight_fake_quant(w, W4))
    assert torch.equal(y, quantize_weight(w, W4).dequantize())  # forward: RTN with the spec
    g = torch.randn_like(w)
    y.backward(g)
    assert w.grad is not None and torch.equal(w.grad, g)  # backward: unchanged (plain STE, no mask)
    # input activations too (and the dtype of the input is kept)
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    act = ActQuantizer(A8)
    z = straight_through(x, act)
    assert z.dtype == torch.float64 and torch.equal(z, act(x.detach()))
    z.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    # a quantizer that returns its input (a disabled one) still gives a separate output
    v = torch.randn(3, requires_grad=True)
    out = straight_through(v, lambda t: t)
    out.sum().backward()
    assert torch.equal(out, v.detach()) and v.grad is not None and torch.equal(v.grad, torch.ones(3))


def test_block_is_left_as_found() -> None:
    model = tiny_llama()
    ctx = _block_ctx(model)
    ctx.block.get_parameter("input_layernorm.weight").requires_grad_(False)  # mixed flags must come back
    before = {n: p.detach().clone() for n, p in ctx.block.named_parameters()}
    flags = {n: p.requires_grad for n, p in ctx.block.named_parameters()}
    with torch.no_grad():  # the pipeline may call quantizers with gradients off
        ZeroQuant(steps=5).apply(ctx)
    _assert_untouched(ctx.block, before, flags)
    # the distilled weights live only in the QuantizedWeights
    assert all("lkd_reverted" not in s for s in ctx.stats.values())
    rtn = {n: quantize_weight(lin.weight, W4).codes for n, lin in ctx.targets.items()}
    assert any(not torch.equal(ctx.qweights[n].codes, codes) for n, codes in rtn.items())


def test_block_is_restored_after_an_error() -> None:
    ctx = _block_ctx(tiny_llama())
    before = {n: p.detach().clone() for n, p in ctx.block.named_parameters()}
    flags = {n: p.requires_grad for n, p in ctx.block.named_parameters()}
    calls = 0

    def fail_in_training(_m: nn.Module, _inp: tuple[torch.Tensor, ...]) -> None:
        nonlocal calls
        calls += 1
        if calls > 2 * len(ctx.inputs):  # teacher pass and first loss pass go through
            raise RuntimeError("boom")

    handle = ctx.block.get_submodule("mlp").register_forward_pre_hook(fail_in_training)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ZeroQuant(steps=3).apply(ctx)
    finally:
        handle.remove()
    _assert_untouched(ctx.block, before, flags)


def test_kv_cache_and_static_activations_in_the_student() -> None:
    """A quantized KV cache stays on in the student (k_proj and v_proj, whose only path to the
    output goes through it, still learn); static activation ranges come from the teacher pass."""
    kv = QuantSpec("int4", "token", None, symmetric=True, dynamic=True)
    static = QuantSpec("int8", "tensor", None, symmetric=True)
    scheme = Scheme(weights=W4, input_activations=static, kv_cache=kv)
    model = tiny_llama()
    float_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = quantize_model(model, Recipe(scheme, (Step("zeroquant"),), "x"), _calib(), batch_size=4, progress=False)
    rtn = _run(Step("rtn"), scheme)
    assert sum(report.block_errors) < sum(rtn.block_errors)
    for name in ("self_attn.k_proj", "self_attn.v_proj"):
        module = model.get_submodule(f"{BLOCK0}.{name}")
        assert isinstance(module, QuantLinear) and module.qweight is not None
        rtn_codes = quantize_weight(float_weights[f"{BLOCK0}.{name}.weight"], W4).codes
        assert not torch.equal(module.qweight.codes, rtn_codes), name
    for m in model.modules():
        if isinstance(m, KVQuantizer):
            assert "forward" not in m.__dict__


def test_kv_quantizer_passes_gradients_straight_through() -> None:
    kvq = KVQuantizer(QuantSpec("int4", "token", None, symmetric=True, dynamic=True), n_kv_heads=2)
    forward = _kv_straight_through(kvq)(0)
    torch.manual_seed(0)
    key, value = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(2))
    kq, vq = forward(key, value)
    expected = kvq(key.detach(), value.detach())
    assert torch.equal(kq, expected[0]) and torch.equal(vq, expected[1])
    (kq.sum() + 2 * vq.sum()).backward()
    assert key.grad is not None and torch.equal(key.grad, torch.ones_like(key))
    assert value.grad is not None and torch.equal(value.grad, torch.full_like(value, 2.0))


def test_diverging_training_falls_back_to_rtn() -> None:
    ctx = _block_ctx(tiny_llama())
    ZeroQuant(steps=3, lr=0.5).apply(ctx)
    for name, lin in ctx.targets.items():
        assert ctx.stats[name]["lkd_reverted"] == 1.0
        assert ctx.stats[name]["lkd_loss_end"] > ctx.stats[name]["lkd_loss_start"]
        assert torch.equal(ctx.qweights[name].codes, quantize_weight(lin.weight, W4).codes), name


def test_activation_only_scheme_does_nothing() -> None:
    ctx = _block_ctx(tiny_llama(), Scheme(input_activations=A8))
    ZeroQuant().apply(ctx)
    assert not ctx.qweights and not ctx.stats


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"lr": 0}, "lr"),
        ({"lr": -1e-4}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"init": "gptq"}, "init"),
        ({"step": 10}, "did you mean 'steps'"),
    ],
)
def test_bad_parameters(params: dict[str, object], fragment: str) -> None:
    with pytest.raises(LowbitError, match=fragment):
        build_algorithm("zeroquant", params)
