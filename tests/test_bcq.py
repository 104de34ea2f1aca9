"""BCQ (LUT-GEMM's binary-coding quantization): numerics against plain loops, the fit against RTN,
the recipe steps, the checkpoint and the exporters' refusal."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from tiny_models import block_context, byte_tokenizer, tiny_llama, token_ids

from lowbit.algorithms import build_algorithm
from lowbit.bcq import (
    BCQWeight,
    bcq_reconstruct,
    bcq_weight,
    best_codes,
    code_values,
    fit_bcq,
    greedy_init,
    least_squares,
    uniform_to_bcq,
)
from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.errors import LowbitError
from lowbit.export import EXPORTERS, export_model
from lowbit.kernels import kernel_plan
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.presets import PRESETS, get_preset
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step, with_group_size


def _spec(bits: int, group: int, observer: str = "minmax") -> QuantSpec:
    args = {"maxshrink": 0.2} if observer == "mse" else {}
    return QuantSpec(f"uint{bits}", "group", group, False, scale_dtype="float16", observer=observer, observer_args=args)


def calibration_shaped(out: int = 96, inp: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights as LLM linears have them: roughly normal rows, input columns of unequal scale and a
    few large outlier columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w = w * (0.5 + 2 * torch.rand(1, inp, generator=g))
    w[:, torch.randperm(inp, generator=g)[:3]] *= 6
    return w


def naive_value(alpha: list[float], z: float, code: int) -> float:
    acc = 0.0
    for i, a in enumerate(alpha):
        acc = acc + a * (1.0 if (code >> i) & 1 else -1.0)
    return acc + z


def test_reconstruct_equals_a_plain_loop() -> None:
    g = torch.Generator().manual_seed(0)
    out, inp, group, bits = 3, 16, 4, 3
    codes = torch.randint(0, 2**bits, (out, inp), generator=g).to(torch.uint8)
    alpha = torch.rand(out, inp // group, bits, generator=g, dtype=torch.float64)
    z = torch.randn(out, inp // group, generator=g, dtype=torch.float64)
    got = bcq_reconstruct(codes, alpha, z, group)
    for o, j in itertools.product(range(out), range(inp)):
        want = naive_value(alpha[o, j // group].tolist(), float(z[o, j // group]), int(codes[o, j]))
        assert got[o, j].item() == want
    values = code_values(alpha, z)
    assert values.shape == (out, inp // group, 2**bits)
    assert values[1, 2, 5].item() == naive_value(alpha[1, 2].tolist(), float(z[1, 2]), 5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_a_uniform_grid_converts_exactly(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    # dyadic scales and minima: every value of the grid and of the conversion is exact in float64
    s = torch.randint(1, 64, (4, 3), generator=g).to(torch.float64) / 256
    m = torch.randint(-512, 512, (4, 3), generator=g).to(torch.float64) / 1024
    c = torch.randint(0, 2**bits, (4, 3 * 8), generator=g)
    alpha, z = uniform_to_bcq(s, m, bits)
    grid = s.repeat_interleave(8, 1) * c + m.repeat_interleave(8, 1)
    assert torch.equal(bcq_reconstruct(c.to(torch.uint8), alpha, z, 8), grid)
    assert torch.equal(alpha[..., 0], s / 2) and torch.equal(z, m + s * (2**bits - 1) / 2)
    # random float64 grids to rounding
    s2 = torch.rand(4, 3, generator=g, dtype=torch.float64)
    m2 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    a2, z2 = uniform_to_bcq(s2, m2, bits)
    want = s2.repeat_interleave(8, 1) * c + m2.repeat_interleave(8, 1)
    torch.testing.assert_close(bcq_reconstruct(c.to(torch.uint8), a2, z2, 8), want, rtol=0, atol=1e-12)


def test_an_rtn_weight_converts_to_bcq_exactly() -> None:
    """lowbit's asymmetric uint3 grid ``scale * (q - zp)`` is ``s * c + m`` with c = q, m = -scale*zp."""
    w = calibration_shaped(16, 64).double()
    qw = quantize_weight(w, QuantSpec("uint3", "group", 16, False))
    scale, zp = qw.scale.double(), qw.zero_point.double()
    alpha, z = uniform_to_bcq(scale, -scale * zp, 3)
    got = bcq_reconstruct(qw.codes, alpha, z, 16)
    torch.testing.assert_close(got, qw.dequantize().double(), rtol=0, atol=1e-7)


def test_greedy_start_is_the_papers() -> None:
    w = calibration_shaped(5, 8).double()
    d = torch.ones_like(w)
    codes, alpha, z = greedy_init(w, d, 2)
    for r in range(5):
        row = w[r].tolist()
        mean = sum(row) / len(row)
        res = [x - mean for x in row]
        a1 = sum(abs(x) for x in res) / len(res)  # the larger plane first
        top = [1 if x >= 0 else 0 for x in res]
        res = [x - a1 * (1 if x >= 0 else -1) for x in res]
        a0 = sum(abs(x) for x in res) / len(res)
        bottom = [1 if x >= 0 else 0 for x in res]
        assert codes[r].tolist() == [2 * t + b for t, b in zip(top, bottom, strict=True)]
        torch.testing.assert_close(alpha[r], torch.tensor([a0, a1], dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(z[r], torch.tensor(mean, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_best_codes_are_the_best_of_every_pattern() -> None:
    w = calibration_shaped(20, 16)
    g = torch.Generator().manual_seed(3)
    alpha, z = torch.rand(20, 3, generator=g) * 0.03, torch.randn(20, generator=g) * 0.01
    codes = best_codes(w, alpha, z)
    for r, j in itertools.product(range(20), range(16)):
        errs = [abs(float(w[r, j]) - naive_value(alpha[r].tolist(), float(z[r]), c)) for c in range(8)]
        got = abs(float(w[r, j]) - naive_value(alpha[r].tolist(), float(z[r]), int(codes[r, j])))
        assert got <= min(errs) + 1e-7


def test_least_squares_solves_each_group() -> None:
    w = calibration_shaped(6, 16).double()
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 8, (6, 16), generator=g)
    codes[0] |= 1  # plane 0 constant in row 0: a singular system
    d = torch.rand(6, 16, generator=g, dtype=torch.float64) + 0.1
    alpha, z = least_squares(w, d, codes, 3)
    for r in range(6):
        a = torch.tensor([[1.0 if (int(c) >> i) & 1 else -1.0 for i in range(3)] + [1.0] for c in codes[r]])
        a = a.double() * d[r].sqrt()[:, None]
        theta = torch.linalg.lstsq(a, (w[r] * d[r].sqrt())[:, None], driver="gelsd").solution[:, 0]
        fit = a @ torch.cat([alpha[r], z[r : r + 1]])
        best = a @ theta
        torch.testing.assert_close(fit, best, rtol=0, atol=1e-10)  # same least-squares minimum


@pytest.mark.parametrize("init", ["greedy", "uniform", "best"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fit_error_never_rises_and_is_what_it_reports(bits: int, init: str) -> None:
    w = calibration_shaped()
    fit = fit_bcq(w, bits, 32, rounds=8, init=init)
    assert all(b <= a for a, b in itertools.pairwise(fit.errors)), fit.errors
    assert fit.errors[-1] < (0.7 if init == "greedy" else 1.0) * fit.errors[0]
    recon = bcq_reconstruct(fit.codes, fit.alpha, fit.offset, 32)
    assert abs(float((w - recon).double().pow(2).sum()) - fit.errors[-1]) <= 1e-6 * fit.errors[-1]


@pytest.mark.parametrize("init", ["greedy", "best"])
@pytest.mark.parametrize(("bits", "group"), [(2, 64), (3, 64), (3, 128), (4, 64)])
def test_bcq_beats_rtn_at_the_same_bits_and_group(bits: int, group: int, init: str) -> None:
    w = calibration_shaped(128, 512)
    fit = fit_bcq(w, bits, group, rounds=10, init=init)
    bcq = bcq_weight(fit, w, _spec(bits, group), group)
    bcq_mse = float((bcq.dequantize() - w).pow(2).mean())
    for observer in ("minmax", "mse"):
        rtn = quantize_weight(w, _spec(bits, group, observer))
        rtn_mse = float((rtn.dequantize() - w).pow(2).mean())
        assert bcq_mse < rtn_mse, (observer, bcq_mse, rtn_mse)


def test_starts() -> None:
    """The uniform start is RTN's MSE-clipped grid written as BCQ; ``best`` takes the better start per group."""
    w = calibration_shaped(32, 128)
    rtn = quantize_weight(w, _spec(3, 64, "mse"))
    uniform = fit_bcq(w, 3, 64, rounds=0, init="uniform")
    recon = bcq_reconstruct(uniform.codes, uniform.alpha, uniform.offset, 64)
    torch.testing.assert_close(recon, rtn.dequantize(), rtol=0, atol=1e-6)
    greedy = fit_bcq(w, 3, 64, rounds=0, init="greedy")
    best = fit_bcq(w, 3, 64, rounds=0, init="best")
    assert best.errors[0] <= min(greedy.errors[0], uniform.errors[0])
    assert best.errors[0] < max(greedy.errors[0], uniform.errors[0])
    with pytest.raises(LowbitError, match="init must be"):
        fit_bcq(w, 3, 64, init="random")


def test_the_weighted_fit_lowers_the_weighted_error() -> None:
    """The activation-aware variant minimises ``sum_j h_j (w_j - w^_j)^2``: lower there than the plain fit."""
    w = calibration_shaped(64, 256)
    h = torch.rand(256, generator=torch.Generator().manual_seed(5)) ** 4 * 100
    plain = fit_bcq(w, 3, 64, rounds=10)
    aware = fit_bcq(w, 3, 64, rounds=10, col_weight=h)

    def weighted(codes: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor) -> float:
        return float(((w - bcq_reconstruct(codes, alpha, z, 64)).pow(2) * h).sum())

    assert weighted(aware.codes, aware.alpha, aware.offset) < 0.95 * weighted(plain.codes, plain.alpha, plain.offset)


def test_stored_weight_and_bits_per_weight() -> None:
    w = calibration_shaped(32, 128)
    fit = fit_bcq(w, 3, 64, rounds=3)
    qw = bcq_weight(fit, w, _spec(3, 64), 64)
    assert qw.alpha.dtype == torch.float16 and qw.offset.dtype == torch.float16 and qw.codes.dtype == torch.uint8
    assert qw.bits_per_weight() == 3 + 4 * 16 / 64
    # the codes are the best ones for the rounded alphas: the error is no worse than the fit's codes'
    rounded = bcq_reconstruct(fit.codes, qw.alpha.float(), qw.offset.float(), 64)
    assert float((qw.dequantize() - w).pow(2).sum()) <= float((rounded - w).pow(2).sum())


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: fit_bcq(torch.randn(4, 64), 5, 32), "1 to 4 bits"),
        (lambda: fit_bcq(torch.randn(4, 96), 3, 64), "do not divide"),
        (lambda: fit_bcq(torch.full((4, 64), float("nan")), 3, 32), "NaN"),
        (lambda: fit_bcq(torch.randn(4, 64), 3, 32, col_weight=-torch.ones(64)), "non-negative"),
        (lambda: fit_bcq(torch.randn(4, 64), 3, 32, rounds=-1), "rounds"),
    ],
)
def test_bad_input_is_a_clear_error(call: object, fragment: str) -> None:
    with pytest.raises(LowbitError, match=fragment):
        call()  # type: ignore[operator]


# --- recipe steps, checkpoint, exporters -----------------------------------------------------

SCHEME = Scheme(weights=_spec(3, 32))


@pytest.fixture(scope="module")
def bcq_model() -> torch.nn.Module:
    """A tiny Llama quantized by the ``bcq`` step (uint3 groups of 32); tests must not change it."""
    model = tiny_llama()
    quantize_model(model, Recipe(SCHEME, (Step("bcq", {"rounds": 6}),), "x"), token_ids(8, 32), 4, progress=False)
    return model


def test_bcq_step_makes_bcq_layers_with_a_lower_error_than_rtn() -> None:
    calib = token_ids(8, 32)
    runs = {}
    for step in ("rtn", "bcq"):
        model = tiny_llama()
        runs[step] = quantize_model(model, Recipe(SCHEME, (Step(step),), "x"), calib, 4, progress=False, measure=True)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bcq is not None and m.qweight is None for m in layers)
    assert sum(runs["bcq"].block_errors) < sum(runs["rtn"].block_errors), (
        runs["bcq"].block_errors,
        runs["rtn"].block_errors,
    )
    row = runs["bcq"].layers[0]
    assert row.bits_per_weight == 3 + 4 * 16 / 32
    assert row.extra["bcq_error"] < row.extra["bcq_error_start"]
    assert kernel_plan(layers[0])[0] == "kept" and "BCQ" in kernel_plan(layers[0])[1]


def test_aware_step_reads_inputs_and_plain_step_does_not() -> None:
    model = tiny_llama()
    plain, aware = build_algorithm("bcq", {}), build_algorithm("bcq_aware", {"rounds": 4})
    assert not plain.needs and aware.needs == {"inputs"}
    ctx = block_context(model, SCHEME, token_ids(8, 32))
    aware.apply(ctx)
    assert ctx.passes == 1 and set(ctx.qweights) == set(ctx.targets)
    assert all(isinstance(q, BCQWeight) for q in ctx.qweights.values())


def test_checkpoint_round_trip_is_exact(tmp_path: Path, bcq_model: torch.nn.Module) -> None:
    model = bcq_model
    save_quantized(model, byte_tokenizer(), tmp_path / "ckpt", {"recipe": "x"})
    loaded, _, meta = load_quantized(tmp_path / "ckpt")
    before = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    after = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert before.keys() == after.keys() and before
    for name, m in before.items():
        a, b = m.bcq, after[name].bcq
        assert a is not None and b is not None
        assert torch.equal(a.codes, b.codes) and torch.equal(a.alpha, b.alpha) and torch.equal(a.offset, b.offset)
        assert a.group_size == b.group_size and a.spec == b.spec
        assert meta["layers"][name]["representation"] == "bcq"
    ids = token_ids(2, 16)
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_damaged_bcq_tensors_are_refused(tmp_path: Path, bcq_model: torch.nn.Module) -> None:
    from safetensors.torch import load_file, save_file

    out = save_quantized(bcq_model, byte_tokenizer(), tmp_path / "ckpt", {"recipe": "x"})
    shard = out / "lowbit-blocks-00000.safetensors"
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("weight_bcq_alpha"))
    tensors[key] = tensors[key][:, :, :2].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(LowbitError, match="BCQ tensors"):
        load_quantized(out, verify=False)


@pytest.mark.parametrize("fmt", list(EXPORTERS))
def test_every_exporter_refuses_bcq(tmp_path: Path, fmt: str, bcq_model: torch.nn.Module) -> None:
    with pytest.raises(LowbitError, match="BCQ") as err:
        export_model(bcq_model, byte_tokenizer(), fmt, tmp_path / "out")
    assert "weights representation" in str(err.value) and "w3a16" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_presets() -> None:
    for name, bits in (("w3a16-bcq", 3), ("w2a16-bcq", 2)):
        recipe = get_preset(name)
        assert name in PRESETS and recipe.steps[0].name == "bcq"
        w = recipe.scheme.weights
        assert w is not None and w.fmt.bits == bits and w.group_size == 64
        assert 576 % 64 == 0 and 1536 % 64 == 0


@pytest.mark.slow
def test_bcq_beats_rtn_on_the_demo_model() -> None:
    """On the demo model's first three blocks, 3-bit groups of 64 (what ``w3a16-bcq`` writes):
    BCQ gives a lower KL to the fp32 model than RTN on the ``w3a16`` grid (MSE-clipped ranges) at
    the same bits and group, and a lower weight error in every layer."""
    from lowbit import api

    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=2, seq_len=128, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=256, n_windows=4)
    first = ("re:model\\.layers\\.[0-2]\\..*",)
    bcq = get_preset("w3a16-bcq")
    bcq = Recipe(dataclasses.replace(bcq.scheme, targets=first), bcq.steps, "bcq")
    rtn_scheme = dataclasses.replace(with_group_size(get_preset("w3a16"), 64).scheme, targets=first)
    results, errors = {}, {}
    for name, recipe in (("bcq", bcq), ("rtn", Recipe(rtn_scheme, (Step("rtn"),), "rtn"))):
        quantized = copy.deepcopy(model)
        report = api.quantize(quantized, recipe, calib, batch_size=2, progress=False)
        assert len(report.layers) == 21
        errors[name] = [layer.rel_error for layer in report.layers]
        results[name] = api.evaluate(quantized, windows, baseline=model, batch_size=2, progress=False)
    assert results["bcq"].kl is not None and results["rtn"].kl is not None
    assert results["bcq"].kl < results["rtn"].kl, (results["bcq"], results["rtn"])
    assert all(b < r for b, r in zip(errors["bcq"], errors["rtn"], strict=True)), errors


def test_to_moves_every_tensor_field() -> None:
    w = torch.randn(8, 16)
    bw = bcq_weight(fit_bcq(w, 3, 8, rounds=2), w, _spec(3, 8), 8)
    moved = bw.to("meta")
    for f in dataclasses.fields(bw):
        value = getattr(bw, f.name)
        if isinstance(value, torch.Tensor):
            assert getattr(moved, f.name).device.type == "meta", f.name
            assert getattr(moved, f.name).dtype == value.dtype, f.name
    assert (moved.group_size, moved.spec) == (bw.group_size, bw.spec)
