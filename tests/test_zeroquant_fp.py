"""ZeroQuant-FP: the FP4 -> FP8 cast on bit patterns (exact for every code and exponent in range,
refused outside), LoRC's factors against a plain SVD, FP8 activations against INT8 on outlier-heavy
data, the zqfp and lorc steps, bits per weight, save/load, the forward and the exporters' refusals."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import byte_tokenizer, tiny_llama, token_ids

from lowbit.algorithms import build_algorithm
from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.errors import LowbitError
from lowbit.export import EXPORTERS, export_model
from lowbit.formats import FLOAT_FORMATS
from lowbit.fpcast import fp4_to_fp8, fp8_weight, pow2_exponents
from lowbit.lorc import lorc_bits, lorc_factors
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.presets import PRESETS, get_preset
from lowbit.primitives import per_token_fake_quantize
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Step, with_group_size

FP4, FP8 = FLOAT_FORMATS["fp4_e2m1"], FLOAT_FORMATS["fp8_e4m3"]
W_FP4 = QuantSpec("fp4_e2m1", "group", 32, scale_dtype="pow2")


def _fits_fp8(v: float) -> bool:
    """Plain rule: FP8 E4M3 holds v exactly iff |v| <= 448 and v is a multiple of its finest step
    2**-9 (FP4 values have at most 2 significant bits, E4M3 normals 4)."""
    return abs(v) <= 448 and (v * 2**9) == int(v * 2**9)


def test_fp4_to_fp8_is_exact_for_every_code_and_exponent_in_range() -> None:
    acts = FP8.round(torch.randn(64) * 3)  # FP8 activations
    checked = refused = 0
    for code in range(16):
        value = float(FP4.from_codes(torch.tensor([code]))[0])
        for exp in range(-12, 10):
            expected = value * 2.0**exp
            c = torch.tensor([code], dtype=torch.uint8)
            if _fits_fp8(expected):
                bits = fp4_to_fp8(c, torch.tensor(exp))
                cast = FP8.from_codes(bits)
                assert float(cast[0]) == expected, (code, exp)
                # the cast weight times the activation is dequantize-then-multiply, bit for bit
                assert torch.equal(cast * acts, (FP4.from_codes(c) * 2.0**exp) * acts)
                if value == 0:
                    assert int(bits[0]) == (0x80 if code & 8 else 0)  # the sign of zero is kept
                checked += 1
            else:
                with pytest.raises(LowbitError, match="leaves FP8's range"):
                    fp4_to_fp8(c, torch.tensor(exp))
                refused += 1
    assert checked > 200 and refused > 20  # both sides of the range were exercised


def test_fp4_to_fp8_on_tensors_broadcasts_exponents() -> None:
    codes = torch.arange(16, dtype=torch.uint8).reshape(2, 8)
    exps = torch.tensor([[-3], [2]])
    assert torch.equal(FP8.from_codes(fp4_to_fp8(codes, exps)), FP4.from_codes(codes) * 2.0**exps)


def test_fp8_weight_of_a_pow2_quantized_weight_is_its_dequantized_weight() -> None:
    w = torch.randn(48, 128) * 0.05
    qw = quantize_weight(w, W_FP4)
    cast = FP8.from_codes(fp8_weight(qw.codes, qw.scale, qw.g_idx))
    assert torch.equal(cast, qw.dequantize())
    x = FP8.round(torch.randn(5, 128))
    assert torch.equal(F.linear(x, cast), F.linear(x, qw.dequantize()))
    unrestricted = quantize_weight(w, dataclasses.replace(W_FP4, scale_dtype="float32"))
    with pytest.raises(LowbitError, match="power-of-two"):
        pow2_exponents(unrestricted.scale)


def test_lorc_factors_are_the_balanced_truncated_svd() -> None:
    g = torch.Generator().manual_seed(0)
    error = torch.randn(40, 24, generator=g, dtype=torch.float64)
    u, v = lorc_factors(error, 5)
    assert u.dtype == v.dtype == torch.float16 and u.shape == (40, 5) and v.shape == (5, 24)
    # reference: the rank-5 truncation from the eigenvectors of E^T E (a different route to the SVD)
    evals, evecs = torch.linalg.eigh(error.T @ error)
    top = evecs[:, -5:]
    best = error @ top @ top.T
    assert torch.allclose(u.double() @ v.double(), best, atol=3e-3)
    # balanced: U^T U and V V^T are both diag(S_r)
    sv = evals[-5:].flip(0).sqrt()
    assert torch.allclose((u.double().T @ u.double()).diagonal(), sv, rtol=2e-3)
    assert torch.allclose((v.double() @ v.double().T).diagonal(), sv, rtol=2e-3)
    assert lorc_factors(error, 100)[0].shape == (40, 24)  # rank clipped
    with pytest.raises(LowbitError, match="positive integer"):
        lorc_factors(error, 0)


def test_lorc_lowers_the_weight_and_output_error_and_costs_its_bits() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g) * 0.05
    x = torch.randn(256, 96, generator=g)
    x[:, [3, 50]] *= 20  # outlier channels, as in calibration data
    qw = quantize_weight(w, W_FP4)
    u, v = lorc_factors(w - qw.dequantize(), 8)
    with_lorc = dataclasses.replace(qw, lorc_u=u, lorc_v=v)
    err = (qw.dequantize() - w).norm()
    assert (with_lorc.dequantize() - w).norm() < 0.9 * err
    assert (x @ (with_lorc.dequantize() - w).T).norm() < (x @ (qw.dequantize() - w).T).norm()
    assert with_lorc.bits_per_weight() == pytest.approx(qw.bits_per_weight() + 16 * 8 * (64 + 96) / (64 * 96))
    assert lorc_bits(64, 96, 8) == pytest.approx(16 * 8 * 160 / 6144)


def test_fp8_activations_beat_int8_on_outlier_channels() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=g)
    x[:, [7, 99, 200]] *= torch.tensor([40.0, -80.0, 120.0])
    fp8 = per_token_fake_quantize(x, FP8, True, "float32")
    int8 = per_token_fake_quantize(x, QuantSpec("int8", "token", None, dynamic=True).fmt, True, "float32")
    assert ((fp8 - x) ** 2).sum() < ((int8 - x) ** 2).sum()


def _fp_recipe(name: str) -> Recipe:
    return with_group_size(get_preset(name), 32)


def test_presets_quantize_cast_and_report() -> None:
    assert {"w4a8-fp", "w4a8-fp-lorc"} <= set(PRESETS)
    plain = quantize_model(tiny_llama(), _fp_recipe("w4a8-fp"), token_ids(2, 8), progress=False)
    model = tiny_llama()
    lorc = quantize_model(model, _fp_recipe("w4a8-fp-lorc"), token_ids(2, 8), progress=False)
    assert plain.forward_passes == 0  # data-free: weights only, activations dynamic
    for p, q in zip(plain.layers, lorc.layers, strict=True):
        assert p.extra["fp8_castable"] == 1.0 and p.extra["scale_exp_max"] < 0
        assert q.rel_error < p.rel_error  # weight error, data-free run
        assert q.extra["lorc_rel_error_after"] < q.extra["lorc_rel_error_before"]
        assert q.bits_per_weight > p.bits_per_weight
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.qweight is not None and layer.act is not None
    qw = layer.qweight
    assert qw.lorc_u is not None and qw.lorc_v is not None and qw.lorc_u.shape[1] == 8
    # the forward applies W^ + U V to the FP8-quantized input
    x = torch.randn(2, 5, layer.in_features)
    plain_w = dataclasses.replace(qw, lorc_u=None, lorc_v=None).dequantize()
    expected = F.linear(layer.act(x), plain_w + qw.lorc_u.float() @ qw.lorc_v.float())
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_unrestricted_scales_are_reported_as_not_castable() -> None:
    recipe = _fp_recipe("w4a8-fp")
    weights = dataclasses.replace(recipe.scheme.weights, scale_dtype="float16")  # type: ignore[arg-type]
    recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, weights=weights))
    report = quantize_model(tiny_llama(), recipe, token_ids(2, 8), progress=False)
    assert all(r.extra["fp8_castable"] == 0.0 for r in report.layers)


def test_lorc_step_checks() -> None:
    with pytest.raises(LowbitError, match="rank"):
        build_algorithm("lorc", {"rank": 0})
    recipe = Recipe(get_preset("w4a8-fp").scheme, (Step("lorc"),), "x")
    with pytest.raises(LowbitError, match="after a quantizer"):
        quantize_model(tiny_llama(), with_group_size(recipe, 32), token_ids(2, 8), progress=False)


def test_lorc_after_rtn_on_an_int_scheme() -> None:
    recipe = with_group_size(Recipe(get_preset("w4a16-rtn").scheme, (Step("rtn"), Step("lorc", {"rank": 4})), "x"), 32)
    report = quantize_model(tiny_llama(), recipe, token_ids(2, 8), progress=False)
    assert all(r.extra["lorc_rel_error_after"] < r.extra["lorc_rel_error_before"] for r in report.layers)


def test_checkpoint_round_trip_and_exporters_refuse_lorc(tmp_path: Path) -> None:
    model = tiny_llama()
    quantize_model(model, _fp_recipe("w4a8-fp-lorc"), token_ids(2, 8), progress=False)
    x = token_ids(2, 16, seed=5)
    with torch.no_grad():
        before = model(x).logits
    out = save_quantized(model, byte_tokenizer(), tmp_path / "ckpt", {"recipe": "w4a8-fp-lorc"})
    loaded, _, meta = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    assert meta["layers"]["model.layers.0.self_attn.q_proj"]["lorc_rank"] == 8
    shard = load_file(str(out / "lowbit-blocks-00000.safetensors"))
    assert shard["model.layers.0.self_attn.q_proj.weight_lorc_u"].dtype == torch.float16
    for fmt in EXPORTERS:
        with pytest.raises(LowbitError, match="LoRC factors") as err:
            export_model(copy.deepcopy(loaded), byte_tokenizer(), fmt, tmp_path / f"out-{fmt}")
        assert "rank 8 fp16 factors" in str(err.value)
    # both factors are listed in the index
    index = json.loads((out / "lowbit.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight_lorc_v" in index["weight_map"]


def test_w4a8_fp_without_lorc_exports_are_refused_by_the_formats_own_checks(tmp_path: Path) -> None:
    model = tiny_llama()
    quantize_model(model, _fp_recipe("w4a8-fp"), token_ids(2, 8), progress=False)
    with pytest.raises(LowbitError, match="cannot export to compressed-tensors") as err:
        export_model(model, byte_tokenizer(), "compressed-tensors", tmp_path / "ct")
    assert "LoRC" not in str(err.value)


@pytest.mark.slow
def test_demo_lorc_and_fp8_activations_lower_kl_and_fp4_weights_cast_to_fp8() -> None:
    """On the demo model (measured: bench/methods_fpq.py): every w4a8-fp weight casts to FP8 exactly,
    LoRC lowers the KL, and FP8 activations give a lower KL than INT8 ones on the same FP4 weights."""
    from lowbit import api

    model, tok = api.load_model("demo")
    windows = api.eval_windows(tok, "demo", seq_len=256, n_windows=2)
    calib = api.calibration_samples(tok, "demo", n_samples=1, seq_len=16, seed=0)  # data-free: unused
    int8_acts = _fp_recipe("w4a8-fp")
    int8_acts = dataclasses.replace(
        int8_acts,
        scheme=dataclasses.replace(int8_acts.scheme, input_activations=QuantSpec("int8", "token", None, dynamic=True)),
    )
    recipes = {
        "w4a8-fp": with_group_size(get_preset("w4a8-fp"), 64),
        "w4a8-fp-lorc": with_group_size(get_preset("w4a8-fp-lorc"), 64),
        "int8-acts": with_group_size(int8_acts, 64),
    }
    kl = {}
    for name, recipe in recipes.items():
        quantized = copy.deepcopy(model)
        report = api.quantize(quantized, recipe, calib, progress=False)
        assert all(r.extra["fp8_castable"] == 1.0 for r in report.layers)
        kl[name] = api.evaluate(quantized, windows, baseline=model, batch_size=2, progress=False).kl
    assert kl["w4a8-fp-lorc"] < kl["w4a8-fp"] < kl["int8-acts"], kl
