"""SignRound: its weight function against a plain loop, the start on RTN's grid is RTN, offsets
and clipping factors stay in bounds, the result is never worse than the start (best seen), and it
runs in the pipeline and is refused with bad parameters."""

from __future__ import annotations

import pytest
import torch
from tiny_models import block_context, tiny_llama, token_ids

from lowbit.algorithms import build_algorithm
from lowbit.algorithms.reconstruction import block_loss
from lowbit.algorithms.rounding import clipped_qparams, grid_range, signround_weight
from lowbit.algorithms.signround import SignRound, SignRounding
from lowbit.algorithms.signweight import contiguous_groups, sign_weight
from lowbit.errors import LowbitError
from lowbit.pipeline import quantize_model
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 16, symmetric=True)
W3 = QuantSpec("uint3", "group", 16, symmetric=False)


@pytest.mark.parametrize("spec", [W4, W3])
def test_factors_of_one_and_no_offsets_give_the_grid_back(spec: QuantSpec) -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, spec)
    lo, hi = grid_range(qw)
    ones = torch.ones_like(lo)
    scale, zp = clipped_qparams(lo, hi, ones, ones, qw)
    # (hi - lo) / (qmax - qmin) may differ from the scale in its last bit (float32 scales)
    assert torch.allclose(scale, qw.scale.float(), rtol=1e-6, atol=0) and torch.equal(zp, qw.zero_point)
    got, q = signround_weight(w, torch.zeros_like(w), scale, zp, qw.g_idx, spec.fmt.qmin, spec.fmt.qmax)
    assert torch.equal(q, qw.grid_values()) and torch.allclose(got, qw.dequantize(), rtol=1e-6, atol=1e-7)


def test_weight_matches_a_loop_and_has_straight_through_gradients() -> None:
    spec = W3
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 32, generator=g)
    qw = quantize_weight(w, spec)
    lo, hi = grid_range(qw)
    a_lo, a_hi = torch.full_like(lo, 0.8), torch.full_like(hi, 0.9)
    v = (torch.rand(w.shape, generator=g) - 0.5).requires_grad_(True)
    scale, zp = clipped_qparams(lo, hi, a_lo, a_hi, qw)
    got, _ = signround_weight(w, v, scale, zp, qw.g_idx, 0, 7)
    for r in range(4):
        for c in range(32):
            gi = int(qw.g_idx[c])
            lo_c, hi_c = min(float(lo[r, gi]) * 0.8, 0.0), max(float(hi[r, gi]) * 0.9, 0.0)
            s = (hi_c - lo_c) / 7
            z = min(max(round(0 - lo_c / s), 0), 7)
            q = min(max(round(float(w[r, c]) / s + float(v[r, c].detach())) + z, 0), 7)
            assert float(got[r, c].detach()) == pytest.approx(s * (q - z), rel=1e-5, abs=1e-6)
    got.sum().backward()
    assert v.grad is not None and bool((v.grad != 0).any())  # round is straight-through


PER_CHANNEL = QuantSpec("int4", "channel", None, symmetric=False)
PER_TENSOR = QuantSpec("int8", "tensor", None, symmetric=True)


@pytest.mark.parametrize(
    ("spec", "layout"),
    [
        (W4, "contiguous"),
        (W3, "contiguous"),
        (W4, "act-order"),
        (W3, "act-order"),
        (PER_CHANNEL, "contiguous"),
        (PER_TENSOR, "contiguous"),
    ],
)
def test_few_pass_weight_equals_the_autograd_formulation(spec: QuantSpec, layout: str) -> None:
    """``signweight.sign_weight`` against ``rounding.signround_weight``: the weight and grid
    values, and the gradients of the offsets, the scale and the zero point (through the clipping
    factors' graph), with clipped weights and both group layouts."""
    g = torch.Generator().manual_seed(3)
    w = 3 * torch.randn(6, 64, generator=g)
    qw = quantize_weight(w, spec)
    if layout == "act-order":  # GPTQ's act-order: groups over a permutation of the columns
        qw.g_idx = qw.g_idx[torch.randperm(64, generator=g)]
    if spec.granularity == "tensor":  # GPTQ stores one (1, 1) scale per tensor
        qw.scale, qw.zero_point = qw.scale[:1], qw.zero_point[:1]
    lo, hi = grid_range(qw)
    v0 = torch.rand(w.shape, generator=g) - 0.5
    f0 = 0.5 + 0.5 * torch.rand(lo.shape, generator=g)
    group = contiguous_groups(qw.g_idx)
    assert (group is None) == (layout == "act-order")
    out = []
    for fn in ("reference", "few-pass"):
        v = v0.clone().requires_grad_(True)
        c_lo, c_hi = f0.clone().requires_grad_(True), f0.flip(0).clone().requires_grad_(True)
        scale, zp = clipped_qparams(lo, hi, c_lo, c_hi, qw)
        args = (w, v, scale, zp, qw.g_idx, spec.fmt.qmin, spec.fmt.qmax)
        weight, q = signround_weight(*args) if fn == "reference" else sign_weight(*args, group)
        upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4))
        (weight * upstream).sum().backward()
        out.append((weight.detach(), q.detach(), v.grad, c_lo.grad, c_hi.grad))
    (w_ref, q_ref, *grads_ref), (w_new, q_new, *grads_new) = out
    assert torch.equal(q_new, q_ref) and bool((q_ref == spec.fmt.qmin).any() or (q_ref == spec.fmt.qmax).any())
    assert torch.equal(w_new, w_ref)
    for name, a, b in zip(("v", "clip_lo", "clip_hi"), grads_ref, grads_new, strict=True):
        assert a is not None and b is not None, name
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-6), name


def _ctx_with_teacher() -> object:
    model = tiny_llama()
    ctx = block_context(model, Scheme(weights=W4), token_ids(4, 32), batch_size=4)  # one batch
    ctx.teacher = ctx.forward()
    for name, linear in ctx.targets.items():
        ctx.qweights[name] = quantize_weight(linear.weight, W4)
    return ctx


def test_offsets_and_clipping_stay_in_bounds_and_the_result_is_never_worse() -> None:
    ctx = _ctx_with_teacher()
    rtn = dict(ctx.qweights)  # type: ignore[attr-defined]
    # a large step on purpose: the parameters jump around, bounds and the best-seen rule must hold
    step = SignRound(iters=25, lr=0.3, min_clip=0.6)
    learners = step.fit(ctx)  # type: ignore[arg-type]
    for learner in learners.values():
        v = learner.v.detach()
        assert float(v.min()) >= -0.5 and float(v.max()) <= 0.5
        for f in (learner.clip_lo.detach(), learner.clip_hi.detach()):
            assert float(f.min()) >= 0.6 and float(f.max()) <= 1.0
    step.apply(ctx)  # type: ignore[arg-type]
    stats = ctx.stats  # type: ignore[attr-defined]
    first = next(iter(stats.values()))
    assert first["recon_loss_end"] <= first["recon_loss_start"]

    def loss(weights: dict) -> float:
        saved = {n: lin.weight.data for n, lin in ctx.targets.items()}  # type: ignore[attr-defined]
        for n, lin in ctx.targets.items():  # type: ignore[attr-defined]
            lin.weight.data = weights[n].dequantize()
        out = ctx.forward()  # type: ignore[attr-defined]
        for n, lin in ctx.targets.items():  # type: ignore[attr-defined]
            lin.weight.data = saved[n]
        return float(sum(block_loss(o, t) for o, t in zip(out, ctx.teacher, strict=True)))  # type: ignore[attr-defined]

    assert loss(ctx.qweights) <= loss(rtn)  # type: ignore[attr-defined]


def test_signround_lowers_the_block_error_in_the_pipeline() -> None:
    def run(steps: tuple[Step, ...]) -> list[float]:
        report = quantize_model(
            tiny_llama(),
            Recipe(Scheme(weights=W4), steps, "x"),
            token_ids(8, 32),
            batch_size=4,
            progress=False,
            measure=True,
        )
        return report.block_errors

    rtn = run((Step("rtn"),))
    # the block error is measured against the float block on the same (quantized) inputs: the
    # target of teacher "block"; the float model's target is tested in test_float_path.py
    learned = run((Step("rtn"), Step("signround", {"iters": 25, "batch": 4, "teacher": "block"})))
    assert sum(learned) < sum(rtn), (learned, rtn)


def test_learner_state_round_trips() -> None:
    w = torch.randn(4, 32)
    learner = SignRounding(w, quantize_weight(w, W4))
    saved = learner.snapshot()
    with torch.no_grad():
        learner.v.fill_(0.3)
    learner.restore(saved)
    assert float(learner.v.detach().abs().max()) == 0.0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(LowbitError, match="min_clip"):
        build_algorithm("signround", {"min_clip": 1.5})
    with pytest.raises(LowbitError, match="iters"):
        build_algorithm("signround", {"iters": 2.5})
    with pytest.raises(LowbitError, match=r"teacher|recipe"):
        ctx = block_context(tiny_llama(), Scheme(weights=W4), token_ids(4, 32))
        SignRound().apply(ctx)
