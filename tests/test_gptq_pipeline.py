"""GPTQ and OWQ as recipe steps on tiny random models: Hessians from the right inputs, true
sequential order, stacking of layers that share an input, reports, checkpoints, presets."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import ARCH_NAMES, block_context, build, tiny_llama, token_ids
from torch import nn

from lowbit import api, checkpoint
from lowbit.algorithms import BlockContext, build_algorithm
from lowbit.algorithms.gptq import GPTQ, OWQ, input_groups
from lowbit.errors import LowbitError
from lowbit.gptq import HessianAccumulator, gptq_quantize
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.presets import PRESETS, get_preset
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 32, symmetric=True)
BLOCK0 = "model.layers.0"


def _recipe(step: Step, spec: QuantSpec = W4) -> Recipe:
    return Recipe(Scheme(weights=spec), (step,), name=step.name)


def _calib() -> torch.Tensor:
    return token_ids(8, 32, seed=1)


def _block_ctx(model: nn.Module, recipe: Recipe) -> BlockContext:
    """Block 0 of ``model`` as the pipeline hands it to an algorithm."""
    return block_context(model, recipe.scheme, _calib())


def _inputs(ctx: BlockContext, module: nn.Module) -> torch.Tensor:
    store: list[torch.Tensor] = []
    ctx.feed_inputs({module: store.append}, stop_early=False)
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in store])


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_gptq_beats_rtn_in_the_pipeline(arch: str) -> None:
    rtn = quantize_model(build(arch), _recipe(Step("rtn")), _calib(), batch_size=4, progress=False, measure=True)
    for params in ({}, {"true_sequential": False, "act_order": False}, {"static_groups": True}):
        report = quantize_model(build(arch), _recipe(Step("gptq", params)), _calib(), batch_size=4, progress=False)
        assert sum(report.block_errors) < 0.8 * sum(rtn.block_errors), (params, report.block_errors)
        for layer in report.layers:
            assert layer.extra["gptq_loss"] > 0 and layer.extra["damp"] == pytest.approx(0.01)
            assert layer.extra["seconds"] >= 0


def test_first_group_matches_a_direct_solve_and_float_weights_are_restored() -> None:
    """q/k/v are solved as one stacked matrix with the Hessian of their shared float input."""
    model = tiny_llama()
    recipe = _recipe(Step("gptq"))
    ctx = _block_ctx(model, recipe)
    before = {n: lin.weight.detach().clone() for n, lin in ctx.targets.items()}
    q, k, v = (ctx.targets[f"self_attn.{p}_proj"] for p in "qkv")
    x = _inputs(ctx, q)
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    stacked = torch.cat([q.weight, k.weight, v.weight]).detach()
    expected = gptq_quantize(stacked, acc.hessian(), W4, act_order=True).weight.dequantize()
    build_algorithm("gptq", {}).apply(ctx)
    got = torch.cat([ctx.qweights[f"self_attn.{p}_proj"].dequantize() for p in "qkv"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for name, lin in ctx.targets.items():  # the pipeline measures errors against the float weights
        assert torch.equal(lin.weight, before[name]), name


def test_true_sequential_calibrates_later_layers_on_quantized_outputs() -> None:
    model = tiny_llama()
    recipe = _recipe(Step("gptq"))
    seq, par = _block_ctx(model, recipe), _block_ctx(copy.deepcopy(model), recipe)
    GPTQ(true_sequential=True).apply(seq)
    GPTQ(true_sequential=False).apply(par)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):  # first group: same inputs
        assert torch.equal(seq.qweights[name].codes, par.qweights[name].codes)
    # o_proj: the sequential Hessian comes from the block with q/k/v already quantized
    o = "self_attn.o_proj"
    assert not torch.equal(seq.qweights[o].codes, par.qweights[o].codes)
    ctx = _block_ctx(copy.deepcopy(model), recipe)
    for p in "qkv":
        ctx.targets[f"self_attn.{p}_proj"].weight.data = seq.qweights[f"self_attn.{p}_proj"].dequantize()
    acc = HessianAccumulator(ctx.targets[o].in_features)
    acc.add(_inputs(ctx, ctx.targets[o]))
    expected = gptq_quantize(ctx.targets[o].weight, acc.hessian(), W4, act_order=True).weight
    assert torch.equal(seq.qweights[o].codes, expected.codes)


def test_feed_inputs_stops_after_the_last_consumer() -> None:
    ctx = _block_ctx(tiny_llama(), _recipe(Step("gptq")))
    calls: list[str] = []
    down = ctx.targets["mlp.down_proj"]
    handle = down.register_forward_pre_hook(lambda *_: calls.append("down"))
    try:
        ctx.feed_inputs({ctx.targets["self_attn.q_proj"]: lambda x: calls.append("q")})
        assert calls == ["q"] * len(ctx.inputs)  # the pass ended at q_proj: down_proj never ran
        calls.clear()
        ctx.feed_inputs({ctx.targets["self_attn.q_proj"]: lambda x: calls.append("q")}, stop_early=False)
        assert calls.count("down") == len(ctx.inputs)
    finally:
        handle.remove()


def test_input_groups_follow_the_architecture() -> None:
    ctx = _block_ctx(tiny_llama(), _recipe(Step("gptq")))
    assert input_groups(ctx) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_per_tensor_layers_are_not_stacked() -> None:
    spec = QuantSpec("int8", "tensor", None, symmetric=True)
    ctx = _block_ctx(tiny_llama(), _recipe(Step("gptq"), spec))
    GPTQ().apply(ctx)
    scales = {n: float(ctx.qweights[n].scale) for n in ("self_attn.q_proj", "self_attn.k_proj")}
    assert scales["self_attn.q_proj"] != scales["self_attn.k_proj"]  # one range per layer, not per stack


def test_owq_keeps_sensitive_columns_and_lowers_the_error(tmp_path: Path) -> None:
    spec = QuantSpec("uint4", "channel", None, symmetric=False)
    base = quantize_model(tiny_llama(), _recipe(Step("gptq"), spec), _calib(), batch_size=4, progress=False)
    model = tiny_llama()
    owq = quantize_model(model, _recipe(Step("owq", {"columns": 6}), spec), _calib(), batch_size=4, progress=False)
    assert sum(owq.block_errors) < sum(base.block_errors)
    for layer, ref in zip(owq.layers, base.layers, strict=True):
        assert layer.extra["float_columns"] == 6
        out, inp = model.get_submodule(layer.name).weight.shape
        assert layer.bits_per_weight == pytest.approx(ref.bits_per_weight + 6 * (16 * out + 16) / (out * inp))
    # the kept columns are those with the largest H_jj * ||W_j - RTN(W)_j||^2 (checked on q_proj)
    module = model.get_submodule(f"{BLOCK0}.self_attn.q_proj")
    assert isinstance(module, QuantLinear) and module.qweight is not None
    kept = module.qweight.outlier_idx
    assert kept is not None and kept.numel() == 6
    ctx = _block_ctx(tiny_llama(), _recipe(Step("owq"), spec))
    x = _inputs(ctx, ctx.targets["self_attn.q_proj"])
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    w = torch.cat([ctx.targets[f"self_attn.{p}_proj"].weight.detach() for p in "qkv"])
    expected = OWQ(columns=6)._keep_columns(w, acc.hessian(), spec)
    assert expected is not None and torch.equal(kept, expected)
    # saved and loaded like every other scheme
    out = api.save_quantized(model, None, tmp_path / "owq", owq)
    loaded, _, meta = checkpoint.load_quantized(out)
    assert meta["layers"][f"{BLOCK0}.self_attn.q_proj"]["float_columns"] == 6
    module2 = loaded.get_submodule(f"{BLOCK0}.self_attn.q_proj")
    assert isinstance(module2, QuantLinear) and module2.qweight is not None
    assert torch.equal(module2.weight, module.weight)
    assert module2.qweight.bits_per_weight() == module.qweight.bits_per_weight()
    ids = token_ids(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_owq_budget_counts_columns_from_extra_bits() -> None:
    spec = QuantSpec("int4", "channel", None, symmetric=True)
    w, h = torch.randn(64, 256), torch.eye(256)
    keep = OWQ(extra_bits=1.0)._keep_columns(w, h, spec)
    assert keep is not None and keep.numel() == (64 * 256) // (16 * 64 + 16)
    assert OWQ(extra_bits=0.0)._keep_columns(w, h, spec) is None
    assert OWQ(columns=300)._keep_columns(w, h, spec).numel() == 255  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"block_size": 0}, "block_size"),
        ({"damp": -1}, "damp"),
        ({"act_ordr": True}, "did you mean 'act_order'"),
    ],
)
def test_bad_gptq_parameters(params: dict[str, object], fragment: str) -> None:
    with pytest.raises(LowbitError, match=fragment):
        build_algorithm("gptq", params)


def test_owq_bad_parameters() -> None:
    with pytest.raises(LowbitError, match="columns"):
        build_algorithm("owq", {"columns": -1})


def test_weight_only_presets_use_gptq_with_mse_clipping() -> None:
    for name in ("w4a16", "w3a16", "w8a16", "w4a16-g32", "w4a16-asym", "w3a16-g32", "w2a16"):
        recipe = get_preset(name)
        assert [s.name for s in recipe.steps] == ["gptq"], name
        assert recipe.scheme.weights is not None and recipe.scheme.weights.observer == "mse", name
    assert [s.name for s in get_preset("w4a16-owq").steps] == ["owq"]
    assert get_preset("w4a16-rtn").scheme == get_preset("w4a16").scheme
    assert [s.name for s in get_preset("w4a16-rtn").steps] == ["rtn"]
    assert "w4a16" in PRESETS


def test_with_method_swaps_the_quantizer() -> None:
    recipe = api.with_method(get_preset("w4a16"), "rtn")
    assert [s.name for s in recipe.steps] == ["rtn"] and recipe.name == "w4a16-rtn"
    assert recipe.scheme == get_preset("w4a16").scheme
    assert api.with_method(get_preset("w4a16"), "gptq") == get_preset("w4a16")
    with pytest.raises(LowbitError, match="did you mean 'gptq'"):
        api.with_method(get_preset("w4a16"), "gpqt")
