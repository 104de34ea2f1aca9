"""lowbit.kernels: torch's CPU int4/int8 kernels against plain references.

The kernel tests build weights whose scales (and int4 offsets) are exactly representable in
bfloat16, so the kernel's weight equals lowbit's dequantized weight bit for bit and the only
differences left are the float32 accumulation order and the bfloat16 rounding of the output.
Models are compared against a bfloat16 reference (close) and lowbit's float32 one (bf16 tolerance).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build, tiny_llama, token_ids
from torch import nn

from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.kernels import (
    Int4Linear,
    Int8Linear,
    KeptLinear,
    int4_codes,
    int4_plan,
    kernel_mismatch,
    kernel_plan,
    kernels_available,
    use_kernels,
)
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.primitives import group_index, symmetric_zero_point
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantSpec, Recipe, Scheme

pytestmark = pytest.mark.skipif(not kernels_available(), reason="this torch has no CPU int4/int8 kernels")


def _qweight(
    fmt: str,
    out: int,
    inp: int,
    granularity: str = "group",
    group: int | None = 128,
    symmetric: bool = True,
    seed: int = 0,
    g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Random codes with scales m * 2^-e (m <= 7), so scales and int4 offsets are exact in bf16."""
    g = torch.Generator().manual_seed(seed)
    f = get_format(fmt)
    spec = QuantSpec(fmt, granularity, group if granularity == "group" else None, symmetric, scale_dtype="float16")
    n_groups = {"tensor": 1, "channel": 1, "group": -(-inp // (group or inp))}[granularity]
    rows = 1 if granularity == "tensor" else out
    q = torch.randint(int(f.qmin), int(f.qmax) + 1, (out, inp), generator=g).to(torch.float32)
    scale = torch.randint(1, 8, (rows, n_groups), generator=g) * 2.0 ** -torch.randint(
        4, 9, (rows, n_groups), generator=g
    )
    if symmetric:
        zp = torch.full((rows, n_groups), float(symmetric_zero_point(f)))
    else:
        zp = torch.randint(int(f.qmin), int(f.qmax) + 1, (rows, n_groups), generator=g).to(torch.float32)
    if g_idx is None:
        g_idx = group_index(inp, group if granularity == "group" else None)
    return QuantizedWeight(f.to_codes(q), scale.to(torch.float16), zp, g_idx, spec)


def _x(rows: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, inp, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``y`` (bf16) is ``x @ w.T (+ bias)`` computed exactly and rounded once to bf16, up to the
    float32 accumulation order: within 1 bf16 ulp plus a float32-sized term."""
    ref = x.double() @ w.double().t()
    if bias is not None:
        ref = ref + bias.double()
    mag = x.double().abs() @ w.double().abs().t()
    err = (y.double() - ref).abs()
    assert y.dtype == torch.bfloat16
    assert torch.all(err <= ref.abs() * 2.0**-8 + mag * 1e-6 + 1e-30), float((err - ref.abs() * 2.0**-8).max())


@pytest.mark.parametrize(("fmt", "symmetric"), [("int4", True), ("uint4", False), ("int4", False), ("uint4", True)])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_group_matches_dequantized_reference(fmt: str, symmetric: bool, group: int) -> None:
    qw = _qweight(fmt, 48, 512, group=group, symmetric=symmetric, seed=group)
    layer = Int4Linear(qw, None)
    x = _x(5, 512)
    _assert_matches(layer(x), x, qw.dequantize())


@pytest.mark.parametrize(("inp", "group"), [(320, 128), (200, 128), (576, 128), (96, 96)])
def test_int4_last_short_group_and_odd_sizes(inp: int, group: int) -> None:
    """A last group shorter than the others (320 = 2.5 x 128), input features padded for the
    kernel (200), and output rows not a multiple of 16 (40)."""
    qw = _qweight("uint4", 40, inp, group=group, symmetric=False, seed=inp)
    layer = Int4Linear(qw, None)
    assert layer.n_pad == 8 and layer.in_features == inp
    bias = torch.randn(40).to(torch.bfloat16)
    layer_b = Int4Linear(qw, bias)
    x = _x(3, inp)
    _assert_matches(layer(x), x, qw.dequantize())
    assert torch.equal(layer(x.reshape(3, 1, inp)), layer(x).reshape(3, 1, 40))  # (batch, seq, features)
    # the bias is added in bf16 after the kernel's own rounding: one more rounding
    ref = (x.double() @ qw.dequantize().double().t() + bias.double()).float()
    torch.testing.assert_close(layer_b(x).float(), ref, rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize(
    ("fmt", "granularity"), [("int4", "channel"), ("uint4", "tensor"), ("int3", "group"), ("int2", "channel")]
)
def test_int4_kernel_takes_channels_tensors_and_fewer_bits(fmt: str, granularity: str) -> None:
    qw = _qweight(fmt, 32, 192, granularity=granularity, group=64, symmetric=fmt != "uint4", seed=3)
    x = _x(4, 192)
    _assert_matches(Int4Linear(qw, None)(x), x, qw.dequantize())


def test_int4_codes_reproduce_lowbit_dequantization_exactly() -> None:
    """(code - 8) * scale + offset is scale * (q - zero_point) for every grid kind (float64)."""
    for fmt, sym in (("int4", True), ("uint4", False), ("int4", False), ("uint4", True), ("int2", True)):
        qw = _qweight(fmt, 16, 96, group=32, symmetric=sym, seed=7)
        codes, scale, offset = int4_codes(qw, None)
        assert int(codes.min()) >= 0 and int(codes.max()) <= 15
        w = (codes.double() - 8) * scale.double() + offset.double()
        torch.testing.assert_close(w, qw.dequantize().double(), rtol=1e-6, atol=1e-9)


def test_act_order_g_idx_is_handled_by_permuting_inputs() -> None:
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    g_idx = torch.empty(256, dtype=torch.int64)
    g_idx[perm] = torch.arange(256) // 64  # act-order: column perm[i] in group i // 64
    qw = _qweight("int4", 32, 256, group=64, seed=2, g_idx=g_idx)
    plan = int4_plan(qw)
    assert not isinstance(plan, str) and plan[1] is not None
    x = _x(3, 256)
    _assert_matches(Int4Linear(qw, None)(x), x, qw.dequantize())


def test_uneven_g_idx_groups_are_refused() -> None:
    g_idx = torch.zeros(128, dtype=torch.int64)
    g_idx[100:] = 1  # 100 + 28 columns: no order makes groups of 64
    qw = _qweight("int4", 16, 128, group=64, g_idx=g_idx)
    assert "g_idx" in str(int4_plan(qw))
    with pytest.raises(LowbitError, match="g_idx"):
        Int4Linear(qw, None)


def test_owq_float_columns() -> None:
    qw = _qweight("int4", 32, 128, group=32, seed=4)
    idx = torch.tensor([3, 77, 100])
    kept = (torch.randint(-64, 64, (32, 3)) / 64).to(torch.float16)
    qw.outlier_idx, qw.outlier_weight = idx, kept
    x = _x(2, 128)
    q8 = _as_int8(qw)
    for layer, w in ((Int4Linear(qw, None), qw.dequantize()), (Int8Linear(q8, None), q8.dequantize())):
        ref = (x.double() @ w.double().t()).float()
        assert torch.equal(w[:, idx], kept.float())  # the float columns are part of the reference
        # the float columns' products are rounded to bf16 before they are added: two roundings
        torch.testing.assert_close(layer(x).float(), ref, rtol=2**-7, atol=1e-2)


def _as_int8(qw: QuantizedWeight) -> QuantizedWeight:
    """The same shape with an int8 per-channel grid (and the float columns kept)."""
    q8 = _qweight("int8", qw.shape[0], qw.shape[1], granularity="channel", seed=9)
    q8.outlier_idx, q8.outlier_weight = qw.outlier_idx, qw.outlier_weight
    return q8


@pytest.mark.parametrize(
    ("fmt", "granularity"), [("int8", "channel"), ("int8", "tensor"), ("int6", "channel"), ("uint8", "channel")]
)
def test_int8_matches_dequantized_reference(fmt: str, granularity: str) -> None:
    qw = _qweight(fmt, 40, 208, granularity=granularity, seed=11)
    assert kernel_plan(QuantLinear(qw, None))[0] == "int8"
    x = _x(6, 208)
    _assert_matches(Int8Linear(qw, None)(x), x, qw.dequantize())


def test_int8_refuses_asymmetric_range_and_groups() -> None:
    asym = _qweight("uint8", 16, 64, granularity="channel", symmetric=False, seed=1)
    asym.zero_point.fill_(10.0)  # codes 0..255 minus 10 do not fit int8
    assert "int8" in kernel_plan(QuantLinear(asym, None))[1]
    grouped = _qweight("int8", 16, 64, group=32)
    kind, why = kernel_plan(QuantLinear(grouped, None))
    assert kind == "kept" and "groups of 32" in why


@pytest.mark.parametrize("inp", [200, 8, 33])
def test_int8_refuses_input_widths_the_kernel_reads_past(inp: int) -> None:
    """torch's bf16 int8 kernel reads K in steps of 16: other widths crashed or gave wrong values."""
    qw = _qweight("int8", 40, inp, granularity="channel", seed=11)
    kind, why = kernel_plan(QuantLinear(qw, None))
    assert kind == "kept" and f"{inp} input features are not a multiple of 16" in why
    with pytest.raises(LowbitError, match="multiple of 16"):
        Int8Linear(qw, None)


@pytest.mark.parametrize(("fmt", "group"), [("int8", None), ("int4", 32)])
def test_kernel_self_check_passes_on_a_correct_kernel(fmt: str, group: int | None) -> None:
    qw = _qweight(fmt, 24, 96, granularity="channel" if group is None else "group", group=group, seed=3)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(1))
    ref = QuantLinear(qw, bias)
    layer = (Int8Linear if fmt == "int8" else Int4Linear)(qw, bias)
    assert kernel_mismatch(layer, ref, torch.bfloat16) == ""


def test_float16_activations_and_float32_refused() -> None:
    qw = _qweight("uint4", 32, 256, group=128, symmetric=False)
    x = _x(2, 256).to(torch.float16)
    y = Int4Linear(qw, None, torch.float16)(x)
    ref = (x.double() @ qw.dequantize().double().t()).float()
    torch.testing.assert_close(y.float(), ref, rtol=2**-9, atol=1e-3)
    with pytest.raises(LowbitError, match="bfloat16"):
        Int4Linear(qw, None, torch.float32)


# --- whole models ----------------------------------------------------------------------------------


def _quantized(weights: QuantSpec, act: QuantSpec | None = None, tie: bool = False) -> nn.Module:
    model = tiny_llama(tie=tie)
    quantize_model(model, Recipe(Scheme(weights=weights, input_activations=act)), token_ids(4, 16), progress=False)
    return model


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_ids(2, 24, seed=5), use_cache=False).logits.float()


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int4", "group", 32, scale_dtype="float16"), QuantSpec("uint4", "group", 64, symmetric=False),
     QuantSpec("int8", "channel", None)],
)  # fmt: skip
def test_model_with_kernels_is_close_to_quantlinear(spec: QuantSpec) -> None:
    model = _quantized(spec, tie=True)
    ref32 = _logits(model)
    ref16 = _logits(copy.deepcopy(model).to(torch.bfloat16))  # the same model, computed in bf16
    fast = copy.deepcopy(model)
    report = use_kernels(fast)
    kind = "int8" if spec.format == "int8" else "int4"
    assert len(getattr(report, kind)) == 14 and not report.kept
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # still tied
    assert fast.lm_head.weight.dtype == torch.bfloat16
    assert fast.model.rotary_emb.inv_freq.dtype == torch.float32
    got = _logits(fast)
    scale = float(ref32.abs().max())
    # bf16 rounds every activation to 8 significant bits: both bf16 computations land within about
    # 0.5% of the largest float32 logit (measured), and within about the same of each other
    assert float((got - ref32).abs().max()) < 0.015 * scale
    assert float((got - ref16).abs().max()) < 0.015 * scale
    assert float((ref16 - ref32).abs().max()) > 0  # the bf16 reference is not the float32 one
    agree = (got.argmax(-1) == ref32.argmax(-1)).float().mean()
    assert agree >= 0.95


def test_refused_layers_are_listed_and_still_run() -> None:
    model = _quantized(QuantSpec("int8", "channel", None), act=QuantSpec("int8", "token", None, dynamic=True))
    fast = copy.deepcopy(model)
    report = use_kernels(fast)
    assert not report.int4 and not report.int8 and len(report.kept) == 14
    assert all("activations are quantized" in why for why in report.kept.values())
    assert isinstance(fast.model.layers[0].self_attn.q_proj, KeptLinear)
    assert any("kept" in line and "activations" in line for line in report.lines())
    ref = _logits(model)
    # the kept layers quantize bf16-rounded inputs, so some int8 activations round the other way
    assert float((_logits(fast) - ref).abs().max()) < 0.03 * float(ref.abs().max())


def test_mixed_model_reports_each_reason() -> None:
    model = _quantized(QuantSpec("int4", "group", 32))
    q = model.model.layers[0].self_attn.q_proj
    small = _qweight("int4", 128, 128, group=16)
    model.model.layers[0].self_attn.q_proj = QuantLinear(small, None)
    fp8 = QuantizedWeight(torch.zeros(128, 128, dtype=torch.uint8), torch.ones(128, 1), torch.zeros(128, 1),
                          torch.zeros(128, dtype=torch.int64), QuantSpec("fp8_e4m3", "channel", None))  # fmt: skip
    model.model.layers[0].self_attn.k_proj = QuantLinear(fp8, None)
    act_only = QuantLinear(None, None, ActQuantizer(QuantSpec("int8", "token", None, dynamic=True)), q.weight)
    model.model.layers[0].self_attn.v_proj = act_only
    report = use_kernels(model)
    assert len(report.int4) == 11
    assert "groups of 16" in report.kept["model.layers.0.self_attn.q_proj"]
    assert "float format" in report.kept["model.layers.0.self_attn.k_proj"]
    assert "float weight" in report.kept["model.layers.0.self_attn.v_proj"]
    assert report.float_linears == ["lm_head"]
    assert torch.isfinite(_logits(model)).all()


def test_float32_activations_are_refused() -> None:
    model = _quantized(QuantSpec("int4", "group", 32))
    with pytest.raises(LowbitError, match="float32 would be far slower"):
        use_kernels(model, torch.float32)


def test_cast_rest_false_keeps_the_rest_in_float32() -> None:
    model = _quantized(QuantSpec("int4", "group", 32))
    ref = _logits(model)
    report = use_kernels(model, cast_rest=False)
    assert len(report.int4) == 14 and report.float_linears == []
    assert model.lm_head.weight.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    got = _logits(model)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) < 0.01 * float(ref.abs().max())


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_other_architectures_and_kv_cache_quantization(arch: str) -> None:
    """Qwen2's q/k/v biases, Gemma3's scaled embedding and (1 + w) norms, and an int8 KV cache."""
    model = build(arch)
    scheme = Scheme(
        weights=QuantSpec("uint4", "group", 64, symmetric=False),
        kv_cache=QuantSpec("int8", "token", None, dynamic=True),
    )
    quantize_model(model, Recipe(scheme), token_ids(4, 16), progress=False)
    ref = _logits(model)
    report = use_kernels(model)
    assert len(report.int4) == 14 and not report.kept
    got = _logits(model)
    # the int8 KV quantizer sees bf16-rounded keys and values: some round the other way (measured ~1.3%)
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


def _wrong_int8_matmul(self: Int8Linear, x2: torch.Tensor) -> torch.Tensor:
    """What a kernel that reads garbage looks like: right shape, wrong values."""
    y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale)
    return y.roll(1, dims=1)


def test_a_kernel_that_disagrees_with_the_reference_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized(QuantSpec("int8", "channel", None))
    ref = _logits(model)
    probes: list[tuple[int, int]] = []
    real = kernels.kernel_mismatch

    def counting(layer: nn.Module, reference: QuantLinear, dtype: torch.dtype) -> str:
        probes.append((reference.out_features, reference.in_features))
        return real(layer, reference, dtype)

    monkeypatch.setattr(kernels, "kernel_mismatch", counting)
    monkeypatch.setattr(Int8Linear, "_matmul", _wrong_int8_matmul)
    report = use_kernels(model)
    shapes = {(m.inner.out_features, m.inner.in_features) for m in model.modules() if isinstance(m, KeptLinear)}
    assert sorted(probes) == sorted(shapes)  # one probe per distinct shape, not per layer
    assert len(probes) < 14 == len(report.kept) and not report.int8
    assert all("from the reference" in why for why in report.kept.values())
    assert any("probe input" in line for line in report.lines())
    got = _logits(model)  # the reference path, in float32 between bf16 casts
    assert float((got - ref).abs().max()) < 0.015 * float(ref.abs().max())


def test_a_kernel_that_raises_on_the_probe_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: Int8Linear, x2: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("expected scales to be bf16\nmore")

    model = _quantized(QuantSpec("int8", "channel", None))
    monkeypatch.setattr(Int8Linear, "_matmul", failing)
    report = use_kernels(model)
    assert not report.int8
    assert set(report.kept.values()) == {"the kernel failed on a probe input: expected scales to be bf16"}
