"""AWQ on tiny random models: the scaling alone keeps the block's function, planted salient
channels make AWQ beat RTN (with RTN or GPTQ after it), brute-force re-implementations of the
alpha search (in the order the folds happen) and of the clip search agree with it, and bad
parameters are errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCH_NAMES, block_context, build, planted_llama, token_ids
from torch import nn

from lowbit.algorithms import BlockContext, build_algorithm
from lowbit.algorithms.awq import AWQ
from lowbit.archs import decoder_blocks, get_arch
from lowbit.errors import LowbitError
from lowbit.pipeline import RunReport, quantize_model
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 32, symmetric=True)
U4 = QuantSpec("uint4", "group", 32, symmetric=False)
SALIENT_CHANNELS = [3, 17, 64, 100]
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32  # tiny_models.SHAPE
GRID = 20
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _calib() -> torch.Tensor:
    return token_ids(8, 32, seed=1)


def _salient_llama() -> nn.Module:
    """A tiny llama whose norms amplify a few channels 20x: the inputs of q/k/v and gate/up have
    salient channels, as in real LLMs."""
    return planted_llama(SALIENT_CHANNELS, 20)


def _block_ctx(model: nn.Module, spec: QuantSpec = W4) -> BlockContext:
    """Block 0 of ``model`` as the pipeline hands it to a transform (weight-only ``spec``)."""
    return block_context(model, Scheme(weights=spec), _calib())


def _inputs(ctx: BlockContext, name: str) -> torch.Tensor:
    """All calibration rows entering module ``name`` (n, in)."""
    store: list[torch.Tensor] = []
    ctx.feed_inputs({ctx.block.get_submodule(name): store.append}, stop_early=False)
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in store])


def _weight(ctx: BlockContext, name: str) -> torch.Tensor:
    return ctx.block.get_submodule(name).weight.detach().clone()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# --- the scaling is an exact rewrite ------------------------------------------------------------------


def _plant_salient(model: nn.Module) -> nn.Module:
    """Multiply the outputs of every block's smoothing norms by 20 in a few channels (Gemma's
    ``1 + w`` norms included), for any architecture of the table."""
    arch = get_arch(model)
    for block in decoder_blocks(model, arch):
        for prev, _ in arch.smooth:
            norm = block.get_submodule(prev)
            if isinstance(norm, nn.Linear):
                continue
            w = norm.weight.data
            offset = 1.0 if arch.norm == "rms_plus_one" else 0.0
            w[SALIENT_CHANNELS] = (w[SALIENT_CHANNELS] + offset) * 20 - offset
    return model


@pytest.mark.parametrize(
    ("arch_name", "params"),
    [(a, {"clip": False}) for a in ARCH_NAMES] + [("llama", {"clip": False, "duo_scaling": True})],
)
def test_scaling_alone_keeps_the_block_function(arch_name: str, params: dict[str, object]) -> None:
    ctx = _block_ctx(_plant_salient(build(arch_name)))
    before = {n: _weight(ctx, n) for n in ctx.targets}
    ref = ctx.forward()
    build_algorithm("awq", params).apply(ctx)
    for got, want in zip(ctx.forward(), ref, strict=True):
        assert _rel(got, want) < 1e-5
    for name in ctx.targets:
        stats = ctx.stats[name]
        assert stats["awq_alpha"] in [i / GRID for i in range(GRID)] and "awq_clip_mean" not in stats
        if params.get("duo_scaling"):
            continue
        assert 0 < stats["awq_loss_ratio"] <= 1, (name, stats)
        # alpha = 0 is s = 1, any other alpha rescales the layer's columns (v_proj's and up_proj's
        # rows are also divided by the v -> o and up -> down scales, so they are left out here)
        if name not in ("self_attn.v_proj", "mlp.up_proj"):
            assert torch.equal(_weight(ctx, name), before[name]) == (stats["awq_alpha"] == 0), (name, stats)
    # not vacuous: the pairs after the planted norms were scaled
    for name in ("self_attn.q_proj", "mlp.gate_proj"):
        assert ctx.stats[name]["awq_alpha"] > 0, (name, ctx.stats[name])


# --- planted salient channels: AWQ beats RTN ---------------------------------------------------------


def _run(steps: list[Step], spec: QuantSpec) -> tuple[RunReport, float]:
    """Quantize a salient llama; its report and its end-to-end error: the relative error of its
    logits against the float model's on held-out tokens. The report measures each block against
    the block after transforms, which AWQ's clipping changes; the logits error does not."""
    ids = token_ids(4, 32, seed=7)
    with torch.no_grad():
        ref = _salient_llama()(input_ids=ids).logits
    model = _salient_llama()
    report = quantize_model(
        model, Recipe(Scheme(weights=spec), tuple(steps)), _calib(), batch_size=4, progress=False, measure=True
    )
    with torch.no_grad():
        got = model(input_ids=ids).logits
    return report, _rel(got, ref) ** 2


@pytest.mark.parametrize("spec", [W4, U4], ids=["int4-g32-sym", "uint4-g32-asym"])
def test_awq_beats_rtn_with_rtn_or_gptq_after_it(spec: QuantSpec) -> None:
    rtn, rtn_err = _run([Step("rtn")], spec)
    scaled, scaled_err = _run([Step("awq", {"clip": False}), Step("rtn")], spec)
    awq, awq_err = _run([Step("awq"), Step("rtn")], spec)
    awq_gptq, awq_gptq_err = _run([Step("awq"), Step("gptq")], spec)
    # the scaling alone is an equivalence, so the report's block errors compare with RTN's
    assert sum(scaled.block_errors) < 0.85 * sum(rtn.block_errors), (scaled.block_errors, rtn.block_errors)
    assert scaled_err < 0.8 * rtn_err, (scaled_err, rtn_err)
    # clipping lowers the true (end-to-end) error further
    assert awq_err < scaled_err, (awq_err, scaled_err)
    assert awq_err < 0.6 * rtn_err, (awq_err, rtn_err)
    # GPTQ after AWQ
    assert sum(awq_gptq.block_errors) < sum(rtn.block_errors) and awq_gptq_err < rtn_err, (awq_gptq_err, rtn_err)
    for report in (scaled, awq, awq_gptq):
        for layer in report.layers:
            assert layer.extra["awq_loss_ratio"] <= 1.0, layer  # alpha = 0 (plain RTN) is a candidate
            clipped = "q_proj" not in layer.name and "k_proj" not in layer.name and report is not scaled
            assert ("awq_clip_mean" in layer.extra) == clipped, layer.name
            if clipped:
                assert 0.5 < layer.extra["awq_clip_mean"] <= 1.0
    assert all("gptq_loss" in layer.extra for layer in awq_gptq.layers)
    # the salient norm pairs gain most: scales far from 1 were chosen there
    for layer in scaled.layers:
        if layer.name.endswith(("q_proj", "gate_proj")):
            assert layer.extra["awq_alpha"] > 0 and layer.extra["awq_loss_ratio"] < 0.8, layer


# --- brute-force re-implementations ------------------------------------------------------------------


def _brute_alpha(
    x: torch.Tensor, weights: list[torch.Tensor], x_mean: torch.Tensor, expand: torch.Tensor | None = None
) -> tuple[float, torch.Tensor, float]:
    """The paper's search, written out: for alpha = i/20, s = x_mean^alpha (>= 1e-4) divided by
    sqrt(max s * min s), loss = sum over layers of ||x (Q(W s) / s)ᵀ - x Wᵀ||². ``expand`` maps
    input columns to entries of s (grouped-query v -> o). Returns (alpha, s, loss / loss at 0)."""
    losses, scales = [], []
    for i in range(GRID):
        s = x_mean.pow(i / GRID).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        cols = s if expand is None else s[expand]
        loss = 0.0
        for w in weights:
            wq = quantize_weight(w * cols, W4).dequantize() / cols
            loss += float((x @ wq.T - x @ w.T).double().pow(2).sum())
        losses.append(loss)
        scales.append(s)
    best = min(range(GRID), key=lambda i: (losses[i], i))
    return best / GRID, scales[best], losses[best] / losses[0]


def _abs_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-column mean |x|, summed in float64 like the implementation: the symmetric int4 grid
    puts every group's negative maximum on a rounding tie (-7.5 steps), so one ulp of difference
    in ``s`` can change codes, and the losses, by ~0.1%."""
    return x.abs().double().mean(0).float()


def test_alpha_search_matches_a_brute_force_in_fold_order() -> None:
    """Pairs are searched last to first on the float block's statistics: down and o see their float
    weights, gate/up see up_proj's rows divided by down's scale, q/k/v see v_proj's divided by o's."""
    fresh = _block_ctx(_salient_llama())
    ctx = _block_ctx(_salient_llama())
    AWQ(clip=False).apply(ctx)

    def check(consumers: tuple[str, ...], weights: list[torch.Tensor], x: torch.Tensor, **kw: object) -> torch.Tensor:
        x_mean = kw.pop("x_mean", _abs_mean(x))
        assert isinstance(x_mean, torch.Tensor)
        alpha, s, ratio = _brute_alpha(x, weights, x_mean, kw.get("expand"))  # type: ignore[arg-type]
        for name in consumers:
            assert ctx.stats[name]["awq_alpha"] == alpha, name
            assert ctx.stats[name]["awq_loss_ratio"] == pytest.approx(ratio, rel=5e-3), name
        return s

    # up -> down
    x = _inputs(fresh, "mlp.down_proj")
    s_down = check(("mlp.down_proj",), [_weight(fresh, "mlp.down_proj")], x)
    torch.testing.assert_close(_weight(ctx, "mlp.down_proj"), _weight(fresh, "mlp.down_proj") * s_down)
    # norm -> gate/up, with up_proj's rows already divided by s_down
    x = _inputs(fresh, "mlp.gate_proj")
    up = _weight(fresh, "mlp.up_proj") / s_down[:, None]
    s_mlp = check(("mlp.gate_proj", "mlp.up_proj"), [_weight(fresh, "mlp.gate_proj"), up], x)
    torch.testing.assert_close(_weight(ctx, "mlp.up_proj"), up * s_mlp)
    # v -> o, grouped-query: o column h * head_dim + d uses value channel (h // 2) * head_dim + d,
    # and that channel's activation mean is averaged over the two query heads sharing it
    x = _inputs(fresh, "self_attn.o_proj")
    expand = torch.tensor([(h // (HEADS // KV_HEADS)) * HEAD_DIM + d for h in range(HEADS) for d in range(HEAD_DIM)])
    per_head = _abs_mean(x).reshape(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    s_vo = check(
        ("self_attn.o_proj",),
        [_weight(fresh, "self_attn.o_proj")],
        x,
        x_mean=per_head.mean(1).reshape(-1),
        expand=expand,
    )
    # norm -> q/k/v, with v_proj's rows already divided by s_vo
    x = _inputs(fresh, "self_attn.q_proj")
    v = _weight(fresh, "self_attn.v_proj") / s_vo[:, None]
    s_qkv = check(QKV, [_weight(fresh, QKV[0]), _weight(fresh, QKV[1]), v], x)
    torch.testing.assert_close(_weight(ctx, "self_attn.v_proj"), v * s_qkv)
    norm = ctx.block.get_submodule("input_layernorm").weight.detach()
    torch.testing.assert_close(norm, fresh.block.get_submodule("input_layernorm").weight.detach() / s_qkv)
    assert ctx.stats[QKV[0]]["awq_alpha"] > 0  # the salient channels make scaling worth it


def test_clip_search_matches_a_brute_force() -> None:
    """After scaling, each (row, group) of o_proj keeps the shrink ratio r = 1 - i/20, i < 10, whose
    clamp to [-r max|w|, r max|w|] gives the smallest ||X_g (w_g - Q(clamp(w_g)))ᵀ||²; q/k are not clipped."""
    scaled, clipped = _block_ctx(_salient_llama()), _block_ctx(_salient_llama())
    AWQ(clip=False).apply(scaled)
    AWQ(clip=True).apply(clipped)
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        assert torch.equal(_weight(clipped, name), _weight(scaled, name)), name
    o = "self_attn.o_proj"
    w, x = _weight(scaled, o), _inputs(scaled, o)  # 256 rows: all of them are used
    groups = w.shape[1] // 32
    amax = w.abs().reshape(w.shape[0], groups, 32).amax(2)  # (out, G)
    ratios = [1 - i / 20 for i in range(10)]
    errs = torch.empty(len(ratios), w.shape[0], groups, dtype=torch.float64)
    for k, r in enumerate(ratios):
        bound = (amax * r).repeat_interleave(32, 1)
        d = w - quantize_weight(torch.maximum(torch.minimum(w, bound), -bound), W4).dequantize()
        for g in range(groups):
            cols = slice(32 * g, 32 * (g + 1))
            errs[k, :, g] = (x[:, cols] @ d[:, cols].T).double().pow(2).sum(0)
    best = torch.tensor(ratios)[errs.argmin(0)]  # argmin: the first (largest r) on exact ties
    bound = (amax * best).repeat_interleave(32, 1)
    expected = torch.maximum(torch.minimum(w, bound), -bound)
    torch.testing.assert_close(_weight(clipped, o), expected, rtol=0, atol=1e-7)
    assert clipped.stats[o]["awq_clip_mean"] == pytest.approx(float(best.mean()))
    assert float(best.min()) < 1  # some groups were clipped


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int4", "channel", None, symmetric=True), QuantSpec("int8", "tensor", None, symmetric=True)],
    ids=["channel", "tensor"],
)
def test_clip_per_channel_and_per_tensor(spec: QuantSpec) -> None:
    ctx = _block_ctx(_salient_llama(), spec)
    AWQ().apply(ctx)
    candidates = [1 - i / 20 for i in range(10)]
    for name, stats in ctx.stats.items():
        if "q_proj" in name or "k_proj" in name:
            continue
        if spec.granularity == "tensor":  # one range for the whole tensor: one ratio
            assert min(abs(stats["awq_clip_mean"] - r) for r in candidates) < 1e-6, (name, stats)
        else:
            assert 0.5 < stats["awq_clip_mean"] <= 1.0


def test_searches_use_min_max_ranges_whatever_the_observer() -> None:
    """An MSE weight observer is left to the quantizer step: AWQ's result is the min-max one."""
    mse = QuantSpec("int4", "group", 32, symmetric=True, observer="mse")
    with_mse, with_minmax = _block_ctx(_salient_llama(), mse), _block_ctx(_salient_llama(), W4)
    AWQ().apply(with_mse)
    AWQ().apply(with_minmax)
    for name in with_minmax.targets:
        assert torch.equal(_weight(with_mse, name), _weight(with_minmax, name)), name
    assert with_mse.stats == with_minmax.stats


# --- parameters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"grid": 0}, "grid"),
        ({"grid": 2.5}, "grid"),
        ({"max_shrink": 0}, "max_shrink"),
        ({"max_shrink": 1}, "max_shrink"),
        ({"max_shrink": 1.5}, "max_shrink"),
        ({"max_shrink": -0.2}, "max_shrink"),
        ({"clip_grid": 0}, "clip_grid"),
        ({"clip_grid": 2, "max_shrink": 0.4}, "only the ratio 1"),
        ({"clip": "yes"}, "clip"),
        ({"duo_scaling": 1}, "duo_scaling"),
        ({"n_rows": 0}, "n_rows"),
        ({"gird": 10}, "did you mean 'grid'"),
    ],
)
def test_bad_parameters(params: dict[str, object], fragment: str) -> None:
    with pytest.raises(LowbitError, match=fragment):
        build_algorithm("awq", params)


def test_a_short_clip_grid_is_fine_without_clipping() -> None:
    assert isinstance(build_algorithm("awq", {"clip": False, "clip_grid": 1}), AWQ)
    assert build_algorithm("awq", {"grid": 1}).kind == "transform"
