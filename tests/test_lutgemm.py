"""LUT-GEMM's look-up matmul against plain loops and against dequantize-then-matmul."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import tiny_llama, token_ids

from lowbit.bcq import BCQWeight
from lowbit.errors import LowbitError
from lowbit.lutgemm import LutGemm, lut_keys, lut_matmul, lut_tables, use_lutgemm
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step


def random_bcq(out: int, inp: int, bits: int, group: int, seed: int = 0, dyadic: bool = False) -> BCQWeight:
    """A BCQ weight with random codes; ``dyadic`` alphas and offsets (k / 64) keep every sum exact."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, inp), generator=g).to(torch.uint8)
    if dyadic:
        alpha = torch.randint(1, 64, (out, inp // group, bits), generator=g).float() / 64
        offset = torch.randint(-64, 64, (out, inp // group), generator=g).float() / 64
    else:
        alpha = torch.rand(out, inp // group, bits, generator=g) * 0.05
        offset = torch.randn(out, inp // group, generator=g) * 0.01
    spec = QuantSpec(f"uint{max(bits, 2)}", "group", group, False)  # provenance only (no uint1 grid)
    return BCQWeight(codes, alpha.half(), offset.half(), group, spec)


def test_tables_are_every_signed_sum() -> None:
    x = torch.randn(2, 8, dtype=torch.float64)
    table = lut_tables(x, 4)
    assert table.shape == (2, 2, 16)
    for b, c, p in itertools.product(range(2), range(2), range(16)):
        want = sum((1.0 if (p >> k) & 1 else -1.0) * float(x[b, c * 4 + k]) for k in range(4))
        assert abs(float(table[b, c, p]) - want) < 1e-12


def test_keys_are_each_planes_bit_pattern() -> None:
    w = random_bcq(3, 16, 3, 8)
    keys = lut_keys(w.codes, 3, 4)
    assert keys.shape == (3, 3, 4)
    for i, o, c in itertools.product(range(3), range(3), range(4)):
        pattern = sum(((int(w.codes[o, c * 4 + k]) >> i) & 1) << k for k in range(4))
        assert int(keys[i, o, c]) == c * 16 + pattern


def test_matmul_equals_a_plain_loop() -> None:
    w = random_bcq(4, 16, 2, 8, seed=1)
    x = torch.randn(2, 16, dtype=torch.float64)
    y = lut_matmul(x, w, lut_keys(w.codes, 2, 4), 4)
    alpha, z = w.alpha.double(), w.offset.double()
    for b, o in itertools.product(range(2), range(4)):
        acc = 0.0
        for j in range(16):
            value = sum(float(alpha[o, j // 8, i]) * (1 if (int(w.codes[o, j]) >> i) & 1 else -1) for i in range(2))
            acc += (value + float(z[o, j // 8])) * float(x[b, j])
        assert abs(float(y[b, o]) - acc) < 1e-12


@pytest.mark.parametrize(("bits", "group", "mu", "batch"), [(1, 8, 8, 1), (2, 16, 8, 1), (3, 32, 4, 3), (4, 64, 8, 5)])
def test_exactly_dequantize_then_matmul_in_float64(bits: int, group: int, mu: int, batch: int) -> None:
    w = random_bcq(24, 128, bits, group, seed=bits, dyadic=True)
    g = torch.Generator().manual_seed(7)
    x = (torch.randint(-32, 32, (batch, 128), generator=g).double()) / 16
    y = LutGemm(w, mu)(x)
    assert torch.equal(y, x @ w.dequantize(torch.float64).t())


@pytest.mark.parametrize("batch", [1, 7])
def test_float32_matches_dequantize_then_matmul(batch: int) -> None:
    w = random_bcq(192, 576, 3, 64, seed=3)
    x = torch.randn(batch, 576)
    torch.testing.assert_close(LutGemm(w)(x), x @ w.dequantize().t(), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, batch, 576)  # leading dimensions are kept
    assert LutGemm(w)(x3).shape == (2, batch, 192)


def test_bad_mu_is_a_clear_error() -> None:
    w = random_bcq(4, 48, 2, 24)
    with pytest.raises(LowbitError, match="divide the BCQ group"):
        LutGemm(w, 5)
    with pytest.raises(LowbitError, match=r"1\.\.12"):
        LutGemm(w, 0)


def test_quant_linear_runs_lutgemm() -> None:
    """A model quantized with BCQ gives the same logits through LUT-GEMM as through its dequantized weights."""
    model = tiny_llama()
    scheme = Scheme(weights=QuantSpec("uint3", "group", 32, False))
    quantize_model(model, Recipe(scheme, (Step("bcq", {"rounds": 2}),), "x"), token_ids(4, 16), 4, progress=False)
    ids = token_ids(2, 12, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        n = use_lutgemm(model)
        assert n == sum(isinstance(m, QuantLinear) for m in model.modules()) and n > 0
        assert all(m.lut is not None for m in model.modules() if isinstance(m, QuantLinear))
        lut = model(ids).logits
        use_lutgemm(model, on=False)
        back = model(ids).logits
    torch.testing.assert_close(lut, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(back, ref)
