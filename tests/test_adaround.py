"""AdaRound / BRECQ: the rectified sigmoid, regulariser and beta schedule against plain loops;
the start reproduces the quantizer's codes; on a layer with correlated inputs the learned
rounding beats RTN and GPTQ on the same grid; the reconstruct stage in the pipeline (zero
iterations change nothing, presets save and load)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_llama, token_ids

from lowbit import api
from lowbit.algorithms import build_algorithm, softround
from lowbit.algorithms.adaround import AdaRound
from lowbit.algorithms.adaround_layer import gram_loss, learn_layer_rounding
from lowbit.algorithms.reconstruction import MiniBatches, autocast, bf16_is_fast, device_room
from lowbit.algorithms.rounding import (
    GAMMA,
    ZETA,
    adaround_codes,
    adaround_start,
    beta_schedule,
    inverse_rectified_sigmoid,
    lr_at,
    rectified_sigmoid,
    rounding_regularizer,
)
from lowbit.algorithms.softround import SoftRounding
from lowbit.checkpoint import load_quantized
from lowbit.errors import LowbitError
from lowbit.gptq import HessianAccumulator, gptq_quantize
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 16, symmetric=True)
W3A = QuantSpec("uint3", "group", 16, symmetric=False)


def test_rectified_sigmoid_matches_a_loop() -> None:
    v = torch.linspace(-8, 8, 101)
    got = rectified_sigmoid(v)
    for x, y in zip(v.tolist(), got.tolist(), strict=True):
        ref = min(1.0, max(0.0, (1 / (1 + math.exp(-x))) * (ZETA - GAMMA) + GAMMA))
        assert y == pytest.approx(ref, abs=1e-6)
    h = torch.linspace(0, 1, 51)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(h)), h, atol=1e-6)


def test_regularizer_matches_a_loop() -> None:
    h = torch.rand(7, 5, generator=torch.Generator().manual_seed(0))
    for beta in (20.0, 7.5, 2.0):
        ref = sum(1 - abs(2 * x - 1) ** beta for x in h.flatten().tolist())
        assert float(rounding_regularizer(h, beta)) == pytest.approx(ref, rel=1e-5)
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0


def test_beta_schedule_matches_a_loop() -> None:
    iters, warmup, start, end = 50, 0.2, 20.0, 2.0
    for step in range(iters):
        got = beta_schedule(step, iters, warmup, start, end)
        if step < warmup * iters:
            assert got is None
        else:
            rel = (step - warmup * iters) / (iters - warmup * iters)
            assert got == pytest.approx(end + (start - end) * (1 - rel))
    assert beta_schedule(10, 50) == 20.0 and beta_schedule(0, 10, warmup=0.0) == 20.0


def _correlated(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Token rows with a strongly non-diagonal covariance (a random mixing of a few factors)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 8, generator=g) @ torch.randn(8, width, generator=g)
    return factors + 0.3 * torch.randn(n, width, generator=g) + 0.5


def test_start_reproduces_the_initial_codes_also_far_from_the_float_weight() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)
    for spec in (W4, W3A):
        qw = quantize_weight(w, spec)
        fmt = spec.fmt
        moved = qw.grid_values() + torch.randint(-2, 3, w.shape, generator=g).float()  # GPTQ-like moves
        qw = dataclasses.replace(qw, codes=fmt.to_codes(moved.clamp(fmt.qmin, fmt.qmax)))
        for init in ("codes", "fraction"):
            base, v0 = adaround_start(w, qw, init)
            assert torch.equal(adaround_codes(base, v0, fmt.qmin, fmt.qmax), qw.grid_values())
            assert SoftRounding(w, qw, init).result().codes.equal(qw.codes)
        # the paper's start: the soft weight is the float weight where q neighbours it (and no clip)
        base, v0 = adaround_start(w, qw, "fraction")
        t = w / qw.scale[:, qw.g_idx] + qw.zero_point[:, qw.g_idx]
        near = ((qw.grid_values() - t).abs() < 0.49) & (t > fmt.qmin) & (t < fmt.qmax)
        soft = base + rectified_sigmoid(v0)
        assert torch.allclose(soft[near], t[near], atol=1e-4)


def test_zero_iterations_and_no_regulariser_reproduce_the_initial_rounding() -> None:
    x = _correlated(512, 32)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    acc = HessianAccumulator(32)
    acc.add(x)
    qw = gptq_quantize(w, acc.hessian(), W4).weight
    rounder = SoftRounding(w, qw)
    grams = (x.T @ x, x.T @ x, x.T @ x, x.shape[0])
    learn_layer_rounding(AdaRound(target="layer", iters=0, lam=0.0), rounder, w, grams)
    assert torch.equal(rounder.result().codes, qw.codes)


def test_layer_rounding_beats_rtn_and_gptq_on_correlated_inputs() -> None:
    x = _correlated(2048, 64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    acc = HessianAccumulator(64)
    acc.add(x)
    rtn = quantize_weight(w, W4)
    gptq = gptq_quantize(w, acc.hessian(), W4, act_order=True, static_groups=True).weight
    assert torch.equal(gptq.scale, rtn.scale)  # the same grid

    def error(qw: object) -> float:
        assert hasattr(qw, "dequantize")
        return float((x @ w.T - x @ qw.dequantize().T).pow(2).sum())

    grams = (x.T @ x, x.T @ x, x.T @ x, x.shape[0])
    for start, init in ((rtn, "fraction"), (gptq, "codes")):
        rounder = SoftRounding(w, start, init)
        before, after = learn_layer_rounding(AdaRound(target="layer", iters=300, init=init), rounder, w, grams)
        learned = rounder.result()
        assert after < before
        assert error(learned) < error(start)
    # from GPTQ's codes (the default start) the learned rounding beats GPTQ, which beats RTN
    assert error(learned) < error(gptq) < error(rtn), (error(learned), error(gptq), error(rtn))
    # the Gram form is the plain loss
    plain = (x @ w.T - x @ learned.dequantize().T).pow(2).sum(1).mean()
    assert float(gram_loss(w, grams)(learned.dequantize())) == pytest.approx(float(plain), rel=1e-3)


def _run(steps: tuple[Step, ...], scheme: Scheme | None = None) -> tuple[torch.nn.Module, list[float], dict]:
    scheme = scheme or Scheme(weights=W4)
    model = tiny_llama()
    report = quantize_model(model, Recipe(scheme, steps, "x"), token_ids(8, 32), batch_size=4, progress=False)
    return model, report.block_errors, {r.name: r.extra for r in report.layers}


def _codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.qweight.codes for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.qweight}


def test_pipeline_zero_iterations_keeps_gptqs_codes() -> None:
    gptq = (Step("gptq", {"act_order": True, "static_groups": True}),)
    base, errors, _ = _run(gptq)
    for target in ("block", "layer"):
        model, errors2, extra = _run((*gptq, Step("adaround", {"iters": 0, "lam": 0.0, "target": target})))
        assert errors2 == errors
        assert all(torch.equal(a, b) for a, b in zip(_codes(base).values(), _codes(model).values(), strict=True))
        assert all("recon_loss_start" in e for e in extra.values())


def test_pipeline_learned_rounding_lowers_the_block_error() -> None:
    gptq = (Step("gptq", {"act_order": True, "static_groups": True}),)
    _, errors, _ = _run(gptq)
    _, learned, extra = _run((*gptq, Step("adaround", {"iters": 60, "target": "layer"})))
    assert sum(learned) < sum(errors), (learned, errors)
    assert any(e.get("recon_flipped", 0) > 0 for e in extra.values())
    _, block, extra = _run((*gptq, Step("adaround", {"iters": 40})))
    assert sum(block) < sum(errors), (block, errors)
    for e in extra.values():  # the block target never keeps a worse result on its report batches
        assert e["recon_loss_end"] <= e["recon_loss_start"]


def test_training_on_the_first_tokens_is_used_on_a_llama_block() -> None:
    """``tokens`` cuts each sequence (and the block's keyword arguments: position ids, rotary
    cos/sin) to its first positions; on a causal llama block that cut is exact, so it is used.
    The tiny llama's head size equals the sequence length (32): only position dimensions are cut."""
    steps = (Step("rtn"), Step("adaround", {"iters": 2, "tokens": 8}))
    _, _, extra = _run(steps)
    assert extra and all(e["recon_exact_cut"] == 1.0 for e in extra.values()), extra
    _, _, extra = _run((Step("rtn"), Step("adaround", {"iters": 2, "tokens": None})))
    assert all(e["recon_exact_cut"] == 0.0 for e in extra.values())


class _RowBlock(torch.nn.Module):
    """Each sequence's output depends on its own row only (``mix``: on the batch mean too)."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.mix = mix

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = 2 * hidden + position_ids[..., None].to(hidden.dtype)
        return out + hidden.mean(0, keepdim=True) if self.mix else out


def _toy_ctx(block: torch.nn.Module) -> SimpleNamespace:
    torch.manual_seed(0)
    inputs = [(torch.randn(b, 5, 3), {"position_ids": torch.arange(5)[None].expand(b, -1)}) for b in (4, 4, 3)]
    with torch.no_grad():
        teacher = [block(h, **kw) for h, kw in inputs]
    return SimpleNamespace(inputs=inputs, teacher=teacher, block=block)


def test_fewer_sequences_than_the_runner_batch_train_on_row_slices() -> None:
    """``batch`` counts sequences: below the runner's batch of 4, a step takes that many rows of
    one batch (keyword arguments sliced alike), every sequence once per epoch; where the rows
    are not independent the whole batches stay."""
    block = _RowBlock()
    batches = MiniBatches(_toy_ctx(block), 1, None, 0)  # type: ignore[arg-type]
    assert batches.exact_rows and batches.per_step == 1 and len(batches.units) == 11
    seen = set()
    for _ in range(11):
        (u,) = batches.draw()
        hidden, kwargs, target = batches.get(u)
        assert hidden.shape == (1, 5, 3) and kwargs["position_ids"].shape == (1, 5)
        assert torch.equal(block(hidden, **kwargs), target)  # the slice's teacher rows
        seen.add(batches.units[u])
    assert len(seen) == 11
    two = MiniBatches(_toy_ctx(_RowBlock()), 2, None, 0)  # type: ignore[arg-type]
    assert sorted({tuple(two.get(u)[0].shape) for u in range(len(two.units))}) == [(1, 5, 3), (2, 5, 3)]
    mixed = MiniBatches(_toy_ctx(_RowBlock(mix=True)), 1, None, 0)  # type: ignore[arg-type]
    assert not mixed.exact_rows and len(mixed.units) == 3 and mixed.get(0)[0].shape == (4, 5, 3)
    _, _, extra = _run((Step("rtn"), Step("adaround", {"iters": 2, "batch": 1})))
    assert extra and all(e["recon_exact_rows"] == 1.0 for e in extra.values()), extra


class _Broken(_RowBlock):
    """Returns NaN from the call ``at`` on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.calls, self.at = 0, at
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super().forward(hidden, position_ids) * self.w
        return out * float("nan") if self.calls >= self.at else out


def test_a_non_finite_step_loss_raises_when_the_loss_is_next_read() -> None:
    """``backward`` returns the loss as a tensor (no wait for the device per step); ``value``
    reads it and raises if any step since the start was not finite, also a step before the one
    read (the callers read every tenth)."""
    ctx = _toy_ctx(_RowBlock())
    block = _Broken(at=10**9)
    ctx.block = block
    batches = MiniBatches(ctx, 4, None, 0)  # type: ignore[arg-type]
    units = batches.draw()
    loss = batches.backward(units)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert batches.value(loss) == pytest.approx(0.0, abs=1e-12)  # the student is the teacher
    block.at = block.calls + 1  # the next step's output is NaN, the one after is fine again
    batches.backward(batches.draw())
    block.at = 10**9
    fine = batches.backward(batches.draw())
    assert fine.isfinite()
    with pytest.raises(FloatingPointError, match="not finite"):
        batches.value(fine)
    assert device_room(torch.device("cpu")) == 0 and not batches._held  # the CPU reads the stores in place


def test_default_learning_rate_is_lr_iters_over_iters_capped_for_the_block_target() -> None:
    assert AdaRound(iters=200).learning_rate() == pytest.approx(30 / 200)
    assert AdaRound(iters=25).learning_rate() == pytest.approx(0.15)  # 30 / 25 = 1.2 capped
    assert AdaRound(iters=25, lr_iters=30.0).learning_rate() == pytest.approx(1.2)  # asked for
    assert AdaRound(iters=25, lr=0.5).learning_rate() == 0.5
    assert AdaRound(iters=25, target="layer").learning_rate() == pytest.approx(10 / 25)


def test_lr_schedule_matches_a_loop_and_is_what_adam_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    for step in range(10):
        assert lr_at(step, 10, 0.2) == 0.2
        assert lr_at(step, 10, 0.2, "linear") == pytest.approx(0.2 * (10 - step) / 10)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_at(0, 10, 0.2, "cosine")
    with pytest.raises(LowbitError, match="lr_schedule"):
        build_algorithm("adaround", {"lr_schedule": "cosine"})
    seen: list[float] = []
    real = softround.adam

    def spying_adam(rounders: list, lr: float) -> torch.optim.Adam:
        optimizer = real(rounders, lr)
        optimizer.register_step_post_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(softround, "adam", spying_adam)
    x = _correlated(256, 32)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    rounder = SoftRounding(w, quantize_weight(w, W4))
    grams = (x.T @ x, x.T @ x, x.T @ x, x.shape[0])
    learn_layer_rounding(AdaRound(target="layer", iters=8, lr=0.4, lr_schedule="linear"), rounder, w, grams)
    assert seen == pytest.approx([0.4 * (8 - i) / 8 for i in range(8)])
    seen.clear()
    _run((Step("gptq"), Step("adaround", {"iters": 4, "lr": 0.1, "lr_schedule": "linear"})))
    assert seen[:4] == pytest.approx([0.1, 0.075, 0.05, 0.025]) and len(seen) % 4 == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_precisions_lower_the_block_error(precision: str) -> None:
    """``precision="bf16"`` autocasts the gradient passes only: the losses that decide whether a
    result is kept stay float32, so the block error still ends below GPTQ's and never above the
    start ("auto", the default, is one of the two depending on the CPU)."""
    gptq = (Step("gptq", {"act_order": True, "static_groups": True}),)
    _, errors, _ = _run(gptq)
    _, block, extra = _run((*gptq, Step("adaround", {"iters": 40, "precision": precision})))
    assert sum(block) < sum(errors), (block, errors)
    for e in extra.values():
        assert e["recon_loss_end"] <= e["recon_loss_start"]


def test_autocast_follows_the_precision() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, "auto"):
        assert (a @ b).dtype == (torch.bfloat16 if bf16_is_fast(cpu) else torch.float32)
    with pytest.raises(ValueError, match="precision"):
        autocast(cpu, "fp16")
    for name in ("adaround", "signround"):
        with pytest.raises(LowbitError, match="precision"):
            build_algorithm(name, {"precision": "half"})


def test_w4a8_fake_quantizes_activations_during_reconstruction() -> None:
    a8 = QuantSpec("int8", "tensor", None, symmetric=True, observer="minmax")
    scheme = Scheme(weights=W4, input_activations=a8)
    for target in ("block", "layer"):
        _, _, extra = _run((Step("rtn"), Step("adaround", {"iters": 3, "target": target})), scheme)
        assert all("recon_loss_start" in e for e in extra.values())


def test_bad_parameters_and_recipes_are_refused() -> None:
    with pytest.raises(LowbitError, match="target"):
        build_algorithm("adaround", {"target": "model"})
    with pytest.raises(LowbitError, match="iters"):
        build_algorithm("adaround", {"iters": -1})
    for step in ("adaround", "signround"):  # the settings both learners share
        for key, value in (
            ("batch", 0),
            ("report_batches", True),
            ("tokens", 0),
            ("tokens", True),
            ("precision", "fp8"),
        ):
            with pytest.raises(LowbitError, match=key):
                build_algorithm(step, {key: value})
    with pytest.raises(LowbitError, match="no quantizer"):
        _run((Step("adaround"),))
    fp4 = QuantSpec("fp4_e2m1", "group", 16, symmetric=True)
    with pytest.raises(LowbitError, match="integer weight grid"):
        _run((Step("rtn"), Step("adaround", {"iters": 1})), Scheme(weights=fp4))


@pytest.mark.parametrize("preset", ["w4a16-ar", "w3a16-ar", "w2a16-ar", "w4a8-ar", "w4a16-signround"])
def test_presets_save_and_load(preset: str, tmp_path: Path) -> None:
    recipe = get_preset(preset)
    # the preset's scheme and steps, fewer iterations (a tiny model, a fast test), groups of 32
    steps = tuple(
        Step(s.name, {**s.params, "iters": 2}) if s.name in ("adaround", "signround") else s for s in recipe.steps
    )
    weights = dataclasses.replace(recipe.scheme.weights, group_size=32)
    recipe = dataclasses.replace(recipe, steps=steps, scheme=dataclasses.replace(recipe.scheme, weights=weights))
    assert any(s.name in ("adaround", "signround") for s in recipe.steps)
    model = tiny_llama()
    report = api.quantize(model, recipe, token_ids(8, 32), progress=False)
    assert all("recon_loss_end" in r.extra for r in report.layers)
    api.save_quantized(model, None, tmp_path / "out", report)
    loaded, _, meta = load_quantized(tmp_path / "out")
    assert [s["name"] if isinstance(s, dict) else s for s in [meta["recipe"]]]  # the provenance was written
    saved, got = _codes(model), _codes(loaded)
    assert saved.keys() == got.keys() and all(torch.equal(saved[n], got[n]) for n in saved)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LOWBIT_LONG_TESTS"),
    reason="long (three demo quantizations, 20 min on one core of a busy 2-core machine): set LOWBIT_LONG_TESTS=1",
)
def test_demo_kl_ordering_ar_gptq_rtn() -> None:
    """On the demo model (groups of 64, symmetric 4-bit: not the grid its weights were stored on),
    KL(fp32 || quantized) orders w4a16-ar < w4a16 (GPTQ) < w4a16-rtn. Kept short: 4 x 128
    calibration tokens, 100 reconstruction steps per block at Adam lr 0.1, 4 evaluation windows of
    256 tokens. (25 steps at the default lr, 30 / 25, flipped codes on noise: 29 of 30 blocks came
    out worse than GPTQ's and were reverted; 100 steps at lr 0.1 lowered blocks 0-2's loss 1.25 -> 1.15,
    1.51 -> 1.04, 2.71 -> 1.94.)"""
    import copy

    from lowbit.scheme import with_group_size

    original, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=4, seq_len=128, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=256, n_windows=4)
    kl = {}
    for name in ("w4a16-rtn", "w4a16", "w4a16-ar"):
        recipe = with_group_size(get_preset(name), 64)
        # the settings it passed with (the float block's target: it ran before the float model's was the default)
        short = {"iters": 100, "lr": 0.1, "batch": 4, "precision": "fp32", "teacher": "block"}
        steps = tuple(Step(s.name, {**s.params, **short}) if s.name == "adaround" else s for s in recipe.steps)
        model = copy.deepcopy(original)
        api.quantize(model, dataclasses.replace(recipe, steps=steps), calib, batch_size=4, progress=False)
        kl[name] = api.evaluate(model, windows, baseline=original, batch_size=4, progress=False).kl
    assert kl["w4a16-ar"] < kl["w4a16"] < kl["w4a16-rtn"], kl
