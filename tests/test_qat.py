"""Quantization-aware training: the straight-through and LSQ numerics against naive loops, and
``lowbit.qat.train`` on a tiny Llama (loss, resume, the checkpoint it writes, starting from PTQ, CLI)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, byte_tokenizer, tiny_llama, token_ids

from lowbit import api, qat
from lowbit.checkpoint import weight_files
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval import evaluate
from lowbit.fakequant import (
    distill_kl,
    lsq_grad_factor,
    next_token_ce,
    scale_gradient,
    ste_fake_quantize,
    stored_scale,
)
from lowbit.formats import get_format
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.primitives import fake_quantize
from lowbit.qat_modules import QATLinear
from lowbit.qat_state import batch_indices, state_dir
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

SEQ = 32


# ---- numerics against naive loops ---------------------------------------------------------------


def _case(fmt_name: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (4, 8), and per-row (4, 1) scales small enough that some entries clip, integer zero points."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    fmt = get_format(fmt_name)
    scale = x.abs().amax(1, keepdim=True) / (1.4 * float(fmt.qmax))  # the largest 40% beyond the range
    zp = torch.zeros(4, 1) if symmetric else torch.tensor([[3.0], [8.0], [7.0], [12.0]])
    return x, scale, zp


def _naive_fq(v: float, s: float, z: float, fmt_name: str) -> float:
    """One element: quantize (half to even, saturate) and dequantize, in float32 steps."""
    fmt = get_format(fmt_name)
    y = torch.tensor(v, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
    q = fmt.round(y.reshape(1))[0] if fmt.is_float else torch.clamp(torch.round(y) + z, fmt.qmin, fmt.qmax)
    return float((q - z) * torch.tensor(s, dtype=torch.float32))


CASES = [("int4", True), ("uint4", False), ("int8", True), ("fp4_e2m1", True), ("fp8_e4m3", True)]


@pytest.mark.parametrize(("fmt_name", "symmetric"), CASES)
def test_ste_forward_is_the_plain_quantize_dequantize(fmt_name: str, symmetric: bool) -> None:
    x, scale, zp = _case(fmt_name, symmetric)
    y = ste_fake_quantize(x, scale, zp, get_format(fmt_name))
    assert torch.equal(y, fake_quantize(x, scale, zp, get_format(fmt_name)))
    for i in range(4):
        for j in range(8):
            assert y[i, j].item() == _naive_fq(x[i, j].item(), scale[i, 0].item(), zp[i, 0].item(), fmt_name)


@pytest.mark.parametrize(("fmt_name", "symmetric"), CASES)
def test_ste_gradient_is_identity_inside_and_zero_outside(fmt_name: str, symmetric: bool) -> None:
    x, scale, zp = _case(fmt_name, symmetric)
    fmt = get_format(fmt_name)
    x.requires_grad_(True)
    upstream = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    (ste_fake_quantize(x, scale, zp, fmt) * upstream).sum().backward()
    assert x.grad is not None
    outside = 0
    for i in range(4):
        for j in range(8):
            u = x[i, j].item() / scale[i, 0].item() + zp[i, 0].item()
            inside = fmt.qmin <= u <= fmt.qmax
            outside += not inside
            assert x.grad[i, j].item() == (upstream[i, j].item() if inside else 0.0)
    assert 0 < outside < 32  # both kinds occur


@pytest.mark.parametrize(("fmt_name", "symmetric"), CASES)
def test_lsq_scale_gradient_equals_the_paper_formula(fmt_name: str, symmetric: bool) -> None:
    x, scale, zp = _case(fmt_name, symmetric)
    fmt = get_format(fmt_name)
    scale = scale.clone().requires_grad_(True)
    factor = lsq_grad_factor(8, fmt)
    upstream = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    (ste_fake_quantize(x, scale_gradient(scale, factor), zp, fmt) * upstream).sum().backward()
    assert scale.grad is not None
    for i in range(4):
        s, z = scale[i, 0].item(), zp[i, 0].item()
        want = 0.0
        for j in range(8):
            v = torch.tensor(x[i, j].item() / s, dtype=torch.float32).item()  # x/s as float32
            u = v + z
            if u < fmt.qmin:
                d = fmt.qmin - z
            elif u > fmt.qmax:
                d = fmt.qmax - z
            else:  # round(v) - v: the grid value in steps, minus the exact position
                q = _naive_fq(x[i, j].item(), s, z, fmt_name) / torch.tensor(s, dtype=torch.float32).item()
                d = q - v
            want += upstream[i, j].item() * d
        want *= 1 / math.sqrt(8 * float(fmt.qmax))
        assert scale.grad[i, 0].item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_scale_gradient_and_stored_scale() -> None:
    s = torch.tensor([0.3, 1e-3], requires_grad=True)
    y = scale_gradient(s, 0.25)
    assert torch.equal(y, s.detach())
    y.sum().backward()
    assert s.grad is not None and torch.equal(s.grad, torch.full((2,), 0.25))
    t = torch.tensor([0.1, 0.3], requires_grad=True)
    half = stored_scale(t, "float16")
    assert torch.equal(half.detach(), t.detach().half().float())
    half.sum().backward()
    assert t.grad is not None and torch.equal(t.grad, torch.ones(2))


def test_distill_kl_and_cross_entropy_against_loops() -> None:
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    temp = 2.0
    total = 0.0
    for b in range(2):
        for t in range(3):
            zs, zt = [v / temp for v in student[b, t].tolist()], [v / temp for v in teacher[b, t].tolist()]
            ns, nt = math.log(sum(math.exp(v) for v in zs)), math.log(sum(math.exp(v) for v in zt))
            total += sum(math.exp(a - nt) * ((a - nt) - (c - ns)) for a, c in zip(zt, zs, strict=True))
    assert distill_kl(student, teacher, temp).item() == pytest.approx(temp * temp * total / 6, rel=1e-5)
    assert distill_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    ce = 0.0
    for b in range(2):
        for t in range(2):
            row = student[b, t].tolist()
            ce += math.log(sum(math.exp(v) for v in row)) - row[int(ids[b, t + 1])]
    assert next_token_ce(student, ids).item() == pytest.approx(ce / 4, rel=1e-5)


def test_window_order_visits_every_window_once_per_epoch() -> None:
    seen = batch_indices(0, 10, 5, seed=0)
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:]) == list(range(5))
    assert batch_indices(3, 4, 5, 0) == seen[3:7]  # a position is all a batch depends on


@pytest.mark.parametrize("unit", ["absolute", "grid"])
@pytest.mark.parametrize("lsq", [False, True])
def test_qat_linear_rounds_into_the_quant_linear_it_trained_as(lsq: bool, unit: str) -> None:
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 64, generator=g) * 0.05)
    wspec = QuantSpec("uint4", "group", 32, symmetric=False, scale_dtype="float16")
    act = ActQuantizer(QuantSpec("int8", "tensor", None, True))
    act.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    layer = QATLinear.from_linear(linear, wspec, act, lsq=lsq, unit=unit)
    assert layer.grid_units == (unit == "grid")
    with torch.no_grad():  # training moved the weights (and scales) off the start grid
        layer.weight.add_(torch.randn(16, 64, generator=g) * (0.7 if unit == "grid" else 0.01))
        for s in layer.trained_scales():
            s.copy_(s + 0.4 if unit == "grid" else s * 1.1)  # grid: the latent r starts at 0
    x = torch.randn(5, 64, generator=g) * 2
    assert torch.equal(layer(x), layer.to_quant_linear()(x))
    start = QATLinear.from_linear(linear, wspec, None, unit=unit)  # untrained: RTN exactly
    rtn = QuantLinear.from_linear(linear, quantize_weight(linear.weight, wspec), None)
    assert torch.equal(start(x), rtn(x))


def test_grid_units_start_on_the_grid_and_an_adam_step_moves_a_weight_lr_times_its_scale() -> None:
    g = torch.Generator().manual_seed(7)
    linear = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(8, 64, generator=g) * 0.05)
    wspec = QuantSpec("int4", "group", 32, True, scale_dtype="float16")
    qw = quantize_weight(linear.weight, wspec)
    start = QuantLinear.from_linear(linear, qw, None)  # as a checkpoint holds it: the weights on the grid
    layer = QATLinear.from_quant_linear(start, unit="grid")
    codes = (qw.dequantize() / qw.scale.float()[:, qw.g_idx]).round()
    assert torch.equal(layer.weight.detach(), codes)  # the latent is the integer grid position
    assert torch.equal(layer.master_weight().detach(), qw.dequantize())
    lr = 0.05
    opt = torch.optim.AdamW([layer.weight], lr=lr, weight_decay=0.0)
    x = torch.randn(4, 64, generator=g)
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is not None
    moving = layer.weight.grad.abs() > 1e-6  # Adam's first step is lr * sign(grad) where |grad| >> eps
    assert moving.float().mean() > 0.9
    before = layer.master_weight().detach().clone()
    opt.step()
    moved = (layer.master_weight().detach() - before).abs()
    s = qw.scale.float()[:, qw.g_idx]
    assert torch.allclose(moved[moving], (lr * s)[moving], rtol=1e-3)
    absolute = QATLinear.from_quant_linear(start, unit="absolute")  # the other unit: lr itself
    opt = torch.optim.AdamW([absolute.weight], lr=lr * 1e-3, weight_decay=0.0)
    absolute(x).pow(2).sum().backward()
    opt.step()
    step = (absolute.weight.detach() - qw.dequantize()).abs()
    assert torch.allclose(step[moving], torch.full_like(step[moving], lr * 1e-3), rtol=1e-3)


def test_lsq_in_grid_units_scales_the_group_and_its_gradient_is_the_grid_value() -> None:
    g = torch.Generator().manual_seed(8)
    linear = torch.nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 32, generator=g) * 0.05)
    wspec = QuantSpec("int4", "channel", None, True, scale_dtype="float32")
    layer = QATLinear.from_linear(linear, wspec, None, lsq=True, unit="grid")
    s0 = layer.scale0.clone()
    assert torch.equal(layer.weight_scale().detach(), s0)  # r = 0: the start scale exactly
    with torch.no_grad():
        layer.scale.fill_(0.7)  # s = s0 * (1 + 0.7 / 7) = 1.1 s0: the whole row's grid scales
    assert torch.allclose(layer.weight_scale().detach(), s0 * 1.1)
    q = torch.clamp(torch.round(layer.weight.detach()), -8, 7)
    assert torch.allclose(layer.fake_weight().detach(), q * s0 * 1.1)
    upstream = torch.randn(4, 32, generator=g)
    (layer.fake_weight() * upstream).sum().backward()
    assert layer.scale.grad is not None
    # d/dr of s0 (1 + r/7) * q, times LSQ's 1/sqrt(N Q_P), N = 32 weights share a row's scale
    want = (upstream * q).sum(1, keepdim=True) * s0 / 7 / math.sqrt(32 * 7)
    assert torch.allclose(layer.scale.grad, want, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        layer.scale.fill_(-100.0)
    layer.keep_scales_positive()
    assert bool((layer.weight_scale() > 0).all())


def test_lr_schedules_and_defaults() -> None:
    c = qat.QATConfig(steps=10, lr_schedule="cosine")
    assert c.learning_rate == qat.DEFAULT_LR["grid"] and c.lr_factor(0) == 1.0
    assert c.lr_factor(5) == pytest.approx(0.5) and c.lr_factor(10) == pytest.approx(0.0)
    assert qat.QATConfig(steps=10, lr_schedule="linear").lr_factor(3) == pytest.approx(0.7)
    assert qat.QATConfig(steps=10).lr_factor(7) == 1.0
    assert qat.QATConfig(lr_unit="absolute").learning_rate == qat.DEFAULT_LR["absolute"]
    assert "steps" in c.fingerprint() and "steps" not in qat.QATConfig().fingerprint()
    for bad in ({"lr_unit": "steps"}, {"lr_schedule": "step"}):
        with pytest.raises(LowbitError, match="must be one of"):
            qat.QATConfig(**bad).check()  # type: ignore[arg-type]


# ---- training on a tiny model --------------------------------------------------------------------

W4 = Recipe(Scheme(weights=QuantSpec("int4", "group", 32, True)), name="w4-g32")
W4A8 = Recipe(
    Scheme(weights=QuantSpec("uint4", "group", 32, False), input_activations=QuantSpec("int8", "tensor", None, True)),
    name="w4a8-static",
)


def _stream(n_windows: int = 24) -> torch.Tensor:
    return token_ids(1, n_windows * SEQ, seed=3).reshape(-1)


def _config(**kw: object) -> qat.QATConfig:
    base = qat.QATConfig(steps=6, lr=3e-2, batch_size=2, seq_len=SEQ, save_every=2)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _train(out: Path, recipe: Recipe | str | None = W4, **kw: object) -> qat.QATResult:
    config = kw.pop("config", _config())
    return qat.train(
        tiny_llama(), recipe, kw.pop("data", _stream()), out, config, tokenizer=byte_tokenizer(), progress=False, **kw
    )  # type: ignore[arg-type]


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in weight_files(out) for k, v in load_file(f).items()}


def test_qat_steps_lower_the_distillation_loss(tmp_path: Path) -> None:
    held = token_ids(8, SEQ, seed=9)
    teacher = tiny_llama()
    start = _train(tmp_path / "rtn", recipe=Recipe(Scheme(weights=QuantSpec("int3", "group", 32, True))),
                   config=_config(steps=0))  # fmt: skip
    trained = _train(tmp_path / "qat", recipe=Recipe(Scheme(weights=QuantSpec("int3", "group", 32, True))),
                     config=_config(steps=30, lr=3e-3, save_every=0))  # fmt: skip
    kl = [evaluate(api.load_quantized(r.out)[0], held, baseline=teacher, progress=False).kl for r in (start, trained)]
    assert kl[0] is not None and kl[1] is not None and kl[1] < 0.9 * kl[0]  # held-out windows, not trained on
    assert sum(trained.losses[-5:]) < sum(trained.losses[:5])


@pytest.mark.parametrize(
    ("recipe", "lsq", "unit", "schedule"),
    [(W4, False, "grid", "cosine"), (W4A8, True, "grid", "linear"), (W4A8, True, "absolute", "constant")],
)
def test_resume_equals_an_uninterrupted_run(
    tmp_path: Path, recipe: Recipe, lsq: bool, unit: str, schedule: str
) -> None:
    config = _config(lsq=lsq, lr_unit=unit, lr_schedule=schedule, lr=3e-2 if unit == "grid" else 1e-4)
    whole = _train(tmp_path / "whole", recipe, config=config)

    def stop(step: int, _loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _train(out, recipe, config=config, on_step=stop)
    assert not out.exists() and (state_dir(out) / "state.pt").is_file()
    with pytest.raises(LowbitError, match="--resume"):  # the left state is not silently overwritten
        _train(out, recipe, config=config)
    resumed = _train(out, recipe, config=config, resume=True)
    assert resumed.start_step == 4 and resumed.losses == whole.losses
    a, b = _tensors(whole.out), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state_dir(out).exists()  # finished: nothing left to resume


def test_the_checkpoint_loads_and_its_weights_lie_on_the_grid(tmp_path: Path) -> None:
    result = _train(tmp_path / "out", W4A8, config=_config(lsq=True, save_every=0))
    model, _, meta = api.load_quantized(result.out)
    assert meta["qat"]["steps"] == 6 and meta["qat"]["lsq"] is True
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    float_model = tiny_llama()
    for layer in layers:
        qw = layer.qweight
        assert qw is not None and layer.act is not None and layer.act.scale is not None
        s, z = qw.scale.float()[:, qw.g_idx], qw.zero_point[:, qw.g_idx]
        assert torch.equal(fake_quantize(layer.weight, s, z, qw.spec.fmt), layer.weight)  # on the grid
        assert torch.equal(layer.weight, qw.dequantize())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q_proj.weight, quantize_weight(float_model.model.layers[0].self_attn.q_proj.weight,
                                                          W4A8.scheme.weights).dequantize())  # fmt: skip


def test_starting_from_a_ptq_checkpoint_reproduces_it_at_step_0(tmp_path: Path) -> None:
    model, tok = tiny_llama(), byte_tokenizer()
    recipe = dataclasses.replace(W4A8, steps=(Step("gptq", {"act_order": True}),))
    report = api.quantize(model, recipe, token_ids(8, SEQ, seed=5), progress=False)
    ptq = api.save_quantized(model, tok, tmp_path / "ptq", report)
    result = qat.train(tiny_llama(), None, _stream(), tmp_path / "qat", _config(steps=0), tokenizer=tok,
                       start=ptq, progress=False)  # fmt: skip
    a, b = api.load_quantized(ptq)[0], api.load_quantized(result.out)[0]
    ids = token_ids(3, SEQ, seed=6)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert api.load_quantized(result.out)[2]["qat"]["start"] == str(ptq)
    with pytest.raises(LowbitError, match="recipe"):  # a checkpoint of another grid than the recipe's
        qat.train(tiny_llama(), W4, _stream(), tmp_path / "x", _config(steps=0), tokenizer=tok, start=ptq,
                  progress=False)  # fmt: skip


def test_scales_only_keeps_every_code_of_the_start_and_lowers_the_loss(tmp_path: Path) -> None:
    """``train_weights=False`` with LSQ (EfficientQAT's E2E-QP): from a GPTQ checkpoint every integer
    code stays, the scales move, and the distillation loss goes down."""
    model, tok = tiny_llama(), byte_tokenizer()
    recipe = Recipe(Scheme(weights=QuantSpec("int3", "group", 32, True)), (Step("gptq"),), "g3")
    ptq = api.save_quantized(model, tok, tmp_path / "ptq", api.quantize(model, recipe, token_ids(8, SEQ, seed=5),
                                                                      progress=False))  # fmt: skip
    config = _config(steps=30, lr=3e-2, lsq=True, train_weights=False, save_every=0)
    result = qat.train(tiny_llama(), None, _stream(), tmp_path / "qat", config, tokenizer=tok, start=ptq,
                       progress=False)  # fmt: skip
    before = [m.qweight for m in api.load_quantized(ptq)[0].modules() if isinstance(m, QuantLinear)]
    after = [m.qweight for m in api.load_quantized(result.out)[0].modules() if isinstance(m, QuantLinear)]
    assert len(before) == len(after) == 14
    assert all(a is not None and b is not None and torch.equal(a.codes, b.codes)
               for a, b in zip(before, after, strict=True))  # fmt: skip
    assert any(not torch.equal(a.scale, b.scale) for a, b in zip(before, after, strict=True) if a and b)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    with pytest.raises(LowbitError, match="--lsq"):
        _config(train_weights=False).check()


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="unknown preset"):
        _train(tmp_path / "a", "w4a16-nope")
    with pytest.raises(LowbitError, match="no weight spec"):
        _train(tmp_path / "b", Recipe(Scheme(input_activations=QuantSpec("int8", "token", None, True, dynamic=True))))
    with pytest.raises(LowbitError, match="fewer than one batch"):
        _train(tmp_path / "c", data=torch.arange(SEQ + 5) % VOCAB)
    with pytest.raises(LowbitError, match="no QAT run to resume"):
        _train(tmp_path / "d", resume=True)
    with pytest.raises(LowbitError, match="needs a recipe"):
        _train(tmp_path / "e", recipe=None)
    with pytest.raises(LowbitError, match="lr"):
        _train(tmp_path / "f", config=_config(lr=-1.0))


def test_cli_help_and_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["qat", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--lsq" in text and "--from" in text and "--no-distill" in text and "--lr-unit" in text
    model_dir, data = tmp_path / "model", tmp_path / "text.txt"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    data.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "out"
    args = ["qat", str(model_dir), "--recipe", "w4a16-rtn", "--data", str(data), "--out", str(out), "--steps", "2",
            "--seq-len", "64", "--lsq", "--no-distill", "--quiet", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    assert f"wrote {out}: 2 steps" in capsys.readouterr().out
    assert api.load_quantized(out)[2]["qat"]["distill"] is False
    assert main(args) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
