"""Olive's outlier-victim pair encoding: codes and values bit for bit against a plain loop over pairs,
the MSE scale search against a loop over candidates, lower error than INT RTN on outlier-heavy data,
the recipe step, its report, save/load, and the exporters' refusals."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer, planted_llama, tiny_llama, token_ids

from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.errors import LowbitError
from lowbit.export import EXPORTERS, export_model
from lowbit.gptq import gptq_quantize
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.olive import (
    OliveGrid,
    olive_decode,
    olive_dynamic_fake_quantize,
    olive_encode,
    olive_fake_quantize,
    olive_grid,
    olive_scale,
    olive_values,
    pair_stats,
)
from lowbit.pipeline import quantize_model
from lowbit.presets import PRESETS, get_preset
from lowbit.primitives import fake_quantize, qparams
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step, spec_from_dict, to_dict

W4 = QuantSpec("int4", "tensor", None, encoding="olive")
A4 = QuantSpec("int4", "tensor", None, dynamic=True, encoding="olive")


# ---- a plain reference, one pair at a time ------------------------------------------------------


def _abfloat_table(grid: OliveGrid) -> list[tuple[float, int, int]]:
    """(magnitude, exponent field, mantissa field) of every abfloat code but e = m = 0."""
    return [
        (2.0 ** (e + grid.bias) * (1 + m / 2**grid.mbits), e, m)
        for e in range(2**grid.ebits)
        for m in range(2**grid.mbits)
        if (e, m) != (0, 0)
    ]


def _ref_abfloat_code(v: float, grid: OliveGrid) -> int:
    """Nearest abfloat magnitude (ties to the even mantissa), as a signed ``bits``-bit code."""
    _, e, m = min(_abfloat_table(grid), key=lambda t: (abs(abs(v) - t[0]), t[2] % 2))
    pattern = (int(v < 0) << (grid.ebits + grid.mbits)) | (e << grid.mbits) | m
    return pattern - 2**grid.bits if pattern >= 2 ** (grid.bits - 1) else pattern


def _ref_abfloat_value(code: int, grid: OliveGrid) -> float:
    pattern = code & (2**grid.bits - 1)
    sign = -1.0 if pattern >> (grid.ebits + grid.mbits) else 1.0
    e, m = (pattern >> grid.mbits) & (2**grid.ebits - 1), pattern & (2**grid.mbits - 1)
    return sign * 2.0 ** (e + grid.bias) * (1 + m / 2**grid.mbits)


def _ref_encode(values: list[float], grid: OliveGrid) -> list[int]:
    lo_out = min(t[0] for t in _abfloat_table(grid))
    threshold = (grid.qmax + lo_out) / 2
    codes: list[int] = []
    for a, b in zip(values[0::2], values[1::2], strict=True):
        out_a, out_b = abs(a) > threshold, abs(b) > threshold
        if out_a and (not out_b or abs(a) >= abs(b)):
            codes += [_ref_abfloat_code(a, grid), grid.identifier]
        elif out_b:
            codes += [grid.identifier, _ref_abfloat_code(b, grid)]
        else:
            codes += [max(-grid.qmax, min(grid.qmax, round(v))) for v in (a, b)]  # round(): half to even
    return codes


def _ref_decode(codes: list[int], grid: OliveGrid) -> list[float]:
    values: list[float] = []
    for a, b in zip(codes[0::2], codes[1::2], strict=True):
        if a == grid.identifier:
            values += [0.0, _ref_abfloat_value(b, grid)]
        elif b == grid.identifier:
            values += [_ref_abfloat_value(a, grid), 0.0]
        else:
            values += [float(a), float(b)]
    return values


def _hard_values(grid: OliveGrid, n: int, seed: int) -> torch.Tensor:
    """Values in units of the scale: normal ones, outliers of every size, ties and exact midpoints."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g) * grid.qmax / 2
    big = torch.sign(torch.randn(n, generator=g)) * torch.exp(torch.rand(n, generator=g) * 1.3 * grid.bits)
    pick = torch.rand(n, generator=g) < 0.3
    y = torch.where(pick, big, normal)
    specials = [0.5, 1.5, 2.5, -3.5, grid.qmax + 0.5, grid.threshold, grid.threshold + 0.01, 14.0, 20.0, 28.0]
    specials += [grid.max_outlier * 3, -grid.max_outlier, 12.0, 12.0, -40.0, 40.0, 9.99, -10.0]
    return torch.cat([y, torch.tensor(specials)])


@pytest.mark.parametrize("bits", [4, 8])
def test_encode_and_decode_match_the_loop_over_pairs(bits: int) -> None:
    grid = olive_grid(bits)
    y = _hard_values(grid, 4000, seed=bits)
    codes = olive_encode(y, grid)
    assert codes.dtype == torch.int8
    assert codes.tolist() == _ref_encode(y.tolist(), grid)
    assert olive_decode(codes, grid).tolist() == _ref_decode(codes.tolist(), grid)
    assert torch.equal(olive_values(y, grid), olive_decode(codes, grid))  # the search's fast path
    # every code fits ``bits`` bits and the identifier sits only beside an abfloat code
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) < 2 ** (bits - 1)
    pairs = codes.reshape(-1, 2)
    assert not bool(((pairs == grid.identifier).all(1)).any())


def test_abfloat_ranges_start_past_the_integer_grid() -> None:
    g4, g8 = olive_grid(4), olive_grid(8)
    assert sorted(t[0] for t in _abfloat_table(g4)) == [12, 16, 24, 32, 48, 64, 96]  # E2M1, 2**bias = 8
    assert (g4.qmax, g4.identifier, g8.qmax, g8.identifier) == (7, -8, 127, -128)
    assert min(t[0] for t in _abfloat_table(g8)) == 144 and g8.max_outlier == 2.0**22 * 1.875  # E4M3, 2**bias = 128
    with pytest.raises(LowbitError, match="4- or 8-bit"):
        olive_grid(3)


def test_two_outliers_keep_the_larger_and_a_tie_keeps_the_first() -> None:
    grid = olive_grid(4)
    codes = olive_encode(torch.tensor([20.0, -50.0, 50.0, -50.0, 3.0, 30.0]), grid)
    values = olive_decode(codes, grid).tolist()
    assert values == [0.0, -48.0, 48.0, 0.0, 0.0, 32.0]
    y = torch.tensor([20.0, -50.0, 50.0, -50.0, 3.0, 30.0])
    assert pair_stats(y, codes, grid) == (3, 3, 3)  # three pairs, each with an outlier, each victim non-zero


def test_without_outliers_olive_is_int_rtn() -> None:
    grid = olive_grid(8)
    x = torch.randn(64, 32)
    scale = x.abs().max() / grid.qmax  # nothing past the grid
    ref = fake_quantize(x, scale, torch.zeros(()), QuantSpec("int8", "tensor", None).fmt)
    assert torch.equal(olive_fake_quantize(x, scale, grid), ref)


def test_odd_width_is_refused() -> None:
    with pytest.raises(LowbitError, match="odd size 5"):
        olive_encode(torch.zeros(2, 5), olive_grid(4))


@pytest.mark.parametrize("bits", [4, 8])
def test_scale_search_matches_a_loop_over_candidates(bits: int) -> None:
    grid = olive_grid(bits)
    x = torch.randn(3, 256) * torch.tensor([[1.0], [0.01], [5.0]])
    x[0, 7] = 40.0
    x[2, :4] = 0.0
    ratios = (0.75, 0.9, 1.0, 1.3, 1.7, 2.2)
    got = olive_scale(x, grid, ratios)
    for row, scale in zip(x, got.tolist(), strict=True):
        base = max(abs(float(row.mean() + 3 * row.std())), abs(float(row.mean() - 3 * row.std())))
        errors = []
        for r in ratios:
            s = torch.tensor(base * r / grid.qmax)
            errors.append((float(((olive_fake_quantize(row, s, grid) - row) ** 2).sum()), float(s)))
        best = min(errors, key=lambda e: e[0])  # min() keeps the first of equal errors
        assert scale == pytest.approx(best[1], rel=1e-6)
    assert olive_scale(torch.zeros(1, 8), grid).tolist() == [1.0]


def _outlier_data(seed: int = 0) -> torch.Tensor:
    """Activations shaped like an LLM's: (tokens, channels) with a few channels 30-60x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=g)
    x[:, [5, 40, 77]] *= torch.tensor([30.0, -45.0, 60.0])
    return x


@pytest.mark.parametrize("bits", [4, 8])
def test_olive_beats_int_rtn_per_tensor_on_outlier_channels(bits: int) -> None:
    x = _outlier_data()
    fmt = QuantSpec(f"int{bits}", "tensor", None).fmt
    scale, zp = qparams(x.min(), x.max(), fmt, symmetric=True)
    rtn = float(((fake_quantize(x, scale, zp, fmt) - x) ** 2).sum())
    olive = float(((olive_dynamic_fake_quantize(x, olive_grid(bits)) - x) ** 2).sum())
    assert olive < 0.5 * rtn, (olive, rtn)


def test_quantize_weight_stores_pair_codes_and_decodes_them() -> None:
    w = _outlier_data(1).T.contiguous()  # (128, 256) with three large rows
    qw = quantize_weight(w, W4)
    grid = olive_grid(4)
    assert qw.scale.shape == (1, 1) and qw.codes.dtype == torch.int8
    assert torch.equal(qw.dequantize(), olive_decode(qw.codes, grid) * qw.scale)
    assert torch.equal(qw.codes, olive_encode(w / qw.scale, grid))
    per_row = quantize_weight(w, dataclasses.replace(W4, granularity="channel"))
    assert per_row.scale.shape == (128, 1)
    assert qw.bits_per_weight() == pytest.approx(4 + 32 / w.numel())


def test_spec_checks() -> None:
    assert "olive" in W4.describe()
    assert to_dict(W4)["encoding"] == "olive" and "encoding" not in to_dict(QuantSpec())
    assert spec_from_dict(to_dict(A4), "x") == A4
    for bad, match in [
        (dict(encoding="pairs"), "only encoding"),
        (dict(format="int3"), "int4 or int8"),
        (dict(format="uint4", symmetric=False), "int4 or int8"),
        (dict(format="fp8_e4m3"), "int4 or int8"),
        (dict(granularity="group", group_size=32), "per tensor"),
        (dict(scale_dtype="float16"), "float32"),
    ]:
        with pytest.raises(LowbitError, match=match):
            dataclasses.replace(W4, **bad)
    with pytest.raises(LowbitError, match="dynamic"):
        Scheme(input_activations=dataclasses.replace(A4, dynamic=False))
    with pytest.raises(LowbitError, match="kv_cache"):
        Scheme(kv_cache=QuantSpec("int8", "tensor", None, encoding="olive"))


def test_gptq_refuses_olive_codes() -> None:
    with pytest.raises(LowbitError, match="olive"):
        gptq_quantize(torch.randn(8, 16), torch.eye(16), W4)


def test_act_quantizer_is_dynamic_per_tensor() -> None:
    x = _outlier_data(2).reshape(4, 64, 128)
    act = ActQuantizer(A4)
    assert torch.equal(act(x), olive_dynamic_fake_quantize(x, olive_grid(4)))


def _rtn_recipe(bits: int) -> Recipe:
    w = QuantSpec(f"int{bits}", "tensor", None)
    a = QuantSpec(f"int{bits}", "tensor", None, dynamic=True)
    return Recipe(Scheme(weights=w, input_activations=a), (Step("rtn"),), f"rtn-w{bits}a{bits}")


def test_preset_beats_int_rtn_in_the_pipeline_and_reports_pairs() -> None:
    calib = token_ids(8, 32)
    olive = quantize_model(
        planted_llama([3, 17], 25.0), get_preset("w4a4-olive"), calib, batch_size=4, progress=False, measure=True
    )
    rtn = quantize_model(
        planted_llama([3, 17], 25.0), _rtn_recipe(4), calib, batch_size=4, progress=False, measure=True
    )
    assert sum(olive.block_errors) < sum(rtn.block_errors), (olive.block_errors, rtn.block_errors)
    q = next(r for r in olive.layers if r.name.endswith("self_attn.q_proj"))
    assert 0 < q.extra["a_outlier_pairs"] < 0.2 and q.extra["a_victims_zeroed"] >= 1
    assert 0 <= q.extra["w_outlier_pairs"] < 0.2 and "w_victims_zeroed" in q.extra
    assert q.activations == "int4 tensor sym dyn olive"


def test_rtn_step_encodes_olive_specs_too() -> None:
    model = tiny_llama()
    quantize_model(model, Recipe(get_preset("w8a8-olive").scheme, (Step("rtn"),), "x"), token_ids(2, 8), progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.qweight is not None
    assert torch.equal(layer.weight, olive_decode(layer.qweight.codes, olive_grid(8)) * layer.qweight.scale)


def test_olive_step_refuses_plain_specs() -> None:
    recipe = Recipe(_rtn_recipe(4).scheme, (Step("olive"),), "x")
    with pytest.raises(LowbitError, match="encoding 'olive'"):
        quantize_model(tiny_llama(), recipe, token_ids(4, 16), batch_size=4, progress=False)


def test_checkpoint_round_trip_and_every_exporter_refuses(tmp_path: Path) -> None:
    model = tiny_llama()
    quantize_model(model, get_preset("w4a4-olive"), token_ids(4, 32), batch_size=4, progress=False)
    x = token_ids(2, 16, seed=5)
    with torch.no_grad():
        before = model(x).logits
    save_quantized(model, byte_tokenizer(), tmp_path / "ckpt", {"recipe": "w4a4-olive"})
    loaded, _, meta = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    layer = loaded.model.layers[1].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and layer.qweight is not None
    assert layer.qweight.spec.encoding == "olive" and meta["layers"]["model.layers.1.self_attn.o_proj"]
    for fmt in EXPORTERS:
        with pytest.raises(LowbitError, match="Olive's outlier-victim pairs") as err:
            export_model(copy.deepcopy(loaded), byte_tokenizer(), fmt, tmp_path / f"out-{fmt}")
        assert "input activations encoding" in str(err.value)
        assert not (tmp_path / f"out-{fmt}").exists()


def test_presets_are_listed() -> None:
    assert {"w4a4-olive", "w8a8-olive"} <= set(PRESETS)
    assert get_preset("w8a8-olive").scheme.weights == dataclasses.replace(W4, format="int8")


@pytest.mark.slow
def test_demo_w8a8_olive_beats_int_rtn_w8a8() -> None:
    """The paper's claim on the demo model: at 8 bits per weight and activation, per tensor, Olive's
    pairs keep the outliers INT RTN clips or spreads its grid over."""
    from lowbit import api

    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=2, seq_len=128, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=256, n_windows=2)
    kl = {}
    for name, recipe in (("olive", get_preset("w8a8-olive")), ("rtn", _rtn_recipe(8))):
        quantized = copy.deepcopy(model)
        report = api.quantize(quantized, recipe, calib, batch_size=2, progress=False)
        kl[name] = api.evaluate(quantized, windows, baseline=model, batch_size=2, progress=False).kl
        if name == "olive":
            assert any(r.extra["a_outlier_pairs"] > 0 for r in report.layers)
    assert kl["olive"] < 0.5 * kl["rtn"], kl
