"""quantize_weight / QuantizedWeight against a naive per-group reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from quant_reference import F32, dequantize_ref, float_code, qparams_ref, quantize_ref

from lowbit.errors import LowbitError
from lowbit.qweight import QuantizedWeight, quantize_weight, weight_ranges
from lowbit.scheme import QuantSpec

SCALE_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "pow2": torch.float32}  # fmt: skip


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column
    w[0, :2] = torch.tensor([0.0, -0.0])
    return w


def _groups(inp: int, spec: QuantSpec) -> list[list[int]]:
    """Column indices of each group of one row, by the definition (last group may be shorter)."""
    if spec.granularity != "group":
        return [list(range(inp))]
    gs = spec.group_size
    assert gs is not None
    return [list(range(s, min(s + gs, inp))) for s in range(0, inp, gs)]


def reference_quantize_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[list, list, list, list]:
    """Per group: min / max -> scale, zero point -> codes -> dequantized values (plain loops)."""
    rows = w.tolist()
    out, inp = w.shape
    name = spec.format
    is_float = spec.fmt.is_float
    if spec.granularity == "tensor":
        flat = [v for r in rows for v in r]
        s, z = qparams_ref(min(flat), max(flat), name, spec.symmetric, spec.scale_dtype)
        scales, zps = [[float(s)]], [[z]]
        params = [[(s, z)] for _ in range(out)]
    else:
        scales, zps, params = [], [], []
        for r in rows:
            ps = []
            for cols in _groups(inp, spec):
                vals = [r[c] for c in cols]
                ps.append(qparams_ref(min(vals), max(vals), name, spec.symmetric, spec.scale_dtype))
            params.append(ps)
            scales.append([float(s) for s, _ in ps])
            zps.append([z for _, z in ps])
    codes, deq = [], []
    col_group = [gi for gi, cols in enumerate(_groups(inp, spec)) for _ in cols]
    for i, r in enumerate(rows):
        crow, drow = [], []
        for j, v in enumerate(r):
            s, z = params[i][col_group[j]]
            q = quantize_ref(v, s, z, name)
            crow.append(float_code(q, name) if is_float else int(q))
            drow.append(dequantize_ref(q, s, z))
        codes.append(crow)
        deq.append(drow)
    return codes, scales, zps, deq


SPECS = [
    QuantSpec("int4", "group", 32, symmetric=True),
    QuantSpec("uint4", "group", 32, symmetric=False),
    QuantSpec("uint4", "group", 32, symmetric=True),
    QuantSpec("int8", "channel", None, symmetric=True),
    QuantSpec("uint8", "channel", None, symmetric=False),
    QuantSpec("int8", "tensor", None, symmetric=True),
    QuantSpec("uint3", "tensor", None, symmetric=False),
    QuantSpec("int2", "group", 16, symmetric=False),
    QuantSpec("uint2", "group", 25, symmetric=False),
    QuantSpec("int4", "group", 32, symmetric=True, scale_dtype="float16"),
    QuantSpec("uint4", "group", 32, symmetric=False, scale_dtype="bfloat16"),
    QuantSpec("fp8_e4m3", "channel", None),
    QuantSpec("fp8_e5m2", "group", 32),
    QuantSpec("fp6_e3m2", "channel", None),
    QuantSpec("fp6_e2m3", "group", 16, scale_dtype="bfloat16"),
    QuantSpec("fp4_e2m1", "group", 32, scale_dtype="pow2"),
    QuantSpec("fp4_e2m1", "tensor", None),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.describe()} {s.scale_dtype}".replace(" ", "-"))
@pytest.mark.parametrize("inp", [96, 100])  # 100 = 3 groups of 32 + a last group of 4
def test_quantize_weight_matches_reference(spec: QuantSpec, inp: int) -> None:
    w = _weight(6, inp, seed=inp + spec.bits)
    qw = quantize_weight(w, spec)
    codes, scales, zps, deq = reference_quantize_weight(w, spec)
    n_groups = len(_groups(inp, spec))
    expect_shape = (1, 1) if spec.granularity == "tensor" else (6, n_groups)
    assert qw.scale.shape == expect_shape and qw.zero_point.shape == expect_shape
    assert qw.scale.dtype == SCALE_TORCH[spec.scale_dtype]
    assert qw.zero_point.dtype == torch.float32
    assert qw.codes.shape == (6, inp)
    assert qw.codes.dtype == (torch.int8 if spec.format.startswith("int") else torch.uint8)
    assert qw.shape == (6, inp)
    group_of_col = [gi for gi, cols in enumerate(_groups(inp, spec)) for _ in cols]
    assert qw.g_idx.dtype == torch.int64 and qw.g_idx.tolist() == group_of_col
    assert qw.scale.float().tolist() == scales
    assert qw.zero_point.tolist() == zps
    assert qw.codes.tolist() == codes
    assert qw.dequantize().dtype == torch.float32
    assert qw.dequantize().tolist() == deq
    # an explicit range gives the same as the observer's own
    lo, hi = weight_ranges(w.float(), spec)
    assert torch.equal(quantize_weight(w, spec, (lo, hi)).codes, qw.codes)


def test_last_short_group_is_its_own_group() -> None:
    spec = QuantSpec("int4", "group", 32)
    w = _weight(3, 100, seed=1)
    w[:, 96:] = torch.tensor([1e-3, -2e-3, 3e-3, 4e-3])  # tiny values in the 4-column tail
    qw = quantize_weight(w, spec)
    assert qw.scale.shape == (3, 4)
    # the tail's scale is its own absmax / 7.5, not shared with the previous group
    assert qw.scale[:, 3].tolist() == [float(F32(4e-3) / F32(7.5))] * 3
    assert torch.equal(qw.g_idx[96:], torch.full((4,), 3))


def test_group_equal_to_in_features_is_per_channel() -> None:
    w = _weight(4, 64, seed=2)
    a = quantize_weight(w, QuantSpec("int4", "group", 64))
    b = quantize_weight(w, QuantSpec("int4", "channel", None))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_explicit_ranges_are_used() -> None:
    spec = QuantSpec("uint4", "group", 16, symmetric=False)
    w = _weight(2, 32, seed=3)
    lo = torch.full((2, 2), -0.01)
    hi = torch.full((2, 2), 0.02)
    qw = quantize_weight(w, spec, (lo, hi))
    s, z = qparams_ref(-0.01, 0.02, "uint4", False)
    assert qw.scale.tolist() == [[float(s)] * 2] * 2 and qw.zero_point.tolist() == [[z] * 2] * 2
    want = [[quantize_ref(v, s, z, "uint4") for v in r] for r in w.tolist()]
    assert qw.codes.tolist() == want  # clipped at the given range


def test_half_weight_is_quantized_in_float32() -> None:
    spec = QuantSpec("int4", "group", 32)
    w = _weight(4, 64, seed=4).half()
    assert torch.equal(quantize_weight(w, spec).codes, quantize_weight(w.float(), spec).codes)


# --- errors and degenerate groups ------------------------------------------------------------------


def test_group_larger_than_in_features() -> None:
    with pytest.raises(LowbitError, match=r"group_size 128 is larger than the input dimension 100"):
        quantize_weight(_weight(2, 100, seed=0), QuantSpec("int4", "group", 128))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(bad: float) -> None:
    w = _weight(2, 64, seed=0)
    w[1, 5] = bad
    with pytest.raises(LowbitError, match="NaN or inf"):
        quantize_weight(w, QuantSpec("int4", "group", 32))
    # also when the ranges are given (no observer looks at the weight)
    ranges = (torch.full((2, 2), -1.0), torch.full((2, 2), 1.0))
    with pytest.raises(LowbitError, match="NaN or inf"):
        quantize_weight(w, QuantSpec("int4", "group", 32), ranges)


def test_weight_must_be_2d() -> None:
    with pytest.raises(LowbitError, match="2-D"):
        quantize_weight(torch.zeros(2, 3, 4), QuantSpec("int4", "group", 2))


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int4", "group", 32), QuantSpec("uint4", "group", 32, symmetric=False),
     QuantSpec("fp4_e2m1", "group", 32, scale_dtype="pow2"),
     QuantSpec("uint8", "channel", None, symmetric=False),
     QuantSpec("fp8_e4m3", "group", 32, scale_dtype="float16")],
    ids=lambda s: s.describe().replace(" ", "-"),
)  # fmt: skip
def test_all_zero_group(spec: QuantSpec) -> None:
    w = _weight(3, 64, seed=5)
    w[1, :32] = 0.0  # one group (and, for per-channel, not a whole row)
    w[2] = 0.0  # a whole row
    qw = quantize_weight(w, spec)
    deq = qw.dequantize()
    assert not torch.isnan(deq).any() and not torch.isnan(qw.scale.float()).any()
    assert torch.equal(deq[1, :32], torch.zeros(32)) and torch.equal(deq[2], torch.zeros(64))
    assert (qw.scale[2].float() == 1.0).all()
    _, _, _, ref = reference_quantize_weight(w, spec)
    assert deq.tolist() == ref


# --- observers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int4", "group", 32, observer="mse"),
     QuantSpec("uint4", "group", 32, symmetric=False, observer="mse"),
     QuantSpec("uint3", "channel", None, symmetric=False, observer="mse", observer_args={"grid": 50}),
     QuantSpec("fp4_e2m1", "group", 16, observer="mse", scale_dtype="pow2"),
     QuantSpec("int8", "tensor", None, observer="mse")],
    ids=lambda s: s.describe().replace(" ", "-"),
)  # fmt: skip
def test_mse_observer_never_worse_than_minmax(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 100, generator=g) * torch.exp2(torch.randint(-3, 3, (8, 1), generator=g).float())
    w[:, 7] *= 8  # outliers make clipping worthwhile
    minmax = dataclasses.replace(spec, observer="minmax", observer_args={})
    d_mse = quantize_weight(w, spec).dequantize().double()
    d_mm = quantize_weight(w, minmax).dequantize().double()
    inp = w.shape[1]
    groups = _groups(inp, spec)
    w64 = w.double()
    rows = [list(range(w.shape[0]))] if spec.granularity == "tensor" else [[i] for i in range(w.shape[0])]
    better = 0
    for r in rows:
        for cols in groups:
            e_mse = ((d_mse[r][:, cols] - w64[r][:, cols]) ** 2).sum().item()
            e_mm = ((d_mm[r][:, cols] - w64[r][:, cols]) ** 2).sum().item()
            assert e_mse <= e_mm * (1 + 1e-6), (r, cols[0], e_mse, e_mm)
            better += e_mse < e_mm * (1 - 1e-3)
    if spec.bits <= 4:  # at 8 bits clipping rarely pays; at 4 and below it must, on data with outliers
        assert better > 0


# --- bits per weight -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "inp", "expect"),
    [
        (QuantSpec("int4", "group", 128), 256, 4 + 32 / 128),
        (QuantSpec("uint4", "group", 128, symmetric=False), 256, 4 + (32 + 4) / 128),
        (QuantSpec("int4", "group", 128, scale_dtype="float16"), 256, 4 + 16 / 128),
        (QuantSpec("uint4", "group", 128, symmetric=False, scale_dtype="bfloat16"), 256, 4 + (16 + 4) / 128),
        (QuantSpec("fp4_e2m1", "group", 32, scale_dtype="pow2"), 256, 4 + 8 / 32),
        (QuantSpec("int8", "channel", None), 256, 8 + 32 / 256),
        (QuantSpec("uint2", "group", 32, symmetric=False), 256, 2 + (32 + 2) / 32),
        (QuantSpec("int4", "group", 32), 100, 4 + 4 * 32 / 100),  # 4 groups per row
        (QuantSpec("fp8_e4m3", "tensor", None), 256, 8 + 32 / (8 * 256)),
        (QuantSpec("fp6_e3m2", "channel", None), 256, 6 + 32 / 256),
    ],
    ids=lambda v: v.describe().replace(" ", "-") if isinstance(v, QuantSpec) else str(v),
)
def test_bits_per_weight(spec: QuantSpec, inp: int, expect: float) -> None:
    qw = quantize_weight(_weight(8, inp, seed=0), spec)
    assert math.isclose(qw.bits_per_weight(), expect, rel_tol=1e-12)


def test_grid_values_and_dequantize_formula() -> None:
    spec = QuantSpec("uint4", "group", 2, symmetric=False)
    qw = QuantizedWeight(
        codes=torch.tensor([[0, 15, 7, 8]], dtype=torch.uint8),
        scale=torch.tensor([[0.5, 2.0]]),
        zero_point=torch.tensor([[3.0, 8.0]]),
        g_idx=torch.tensor([0, 0, 1, 1]),
        spec=spec,
    )
    assert qw.grid_values().tolist() == [[0.0, 15.0, 7.0, 8.0]]
    assert qw.dequantize().tolist() == [[-1.5, 6.0, -2.0, 0.0]]
    fp = QuantizedWeight(
        codes=torch.tensor([[0x7, 0xF, 0x1]], dtype=torch.uint8),
        scale=torch.tensor([[0.25]]),
        zero_point=torch.zeros(1, 1),
        g_idx=torch.zeros(3, dtype=torch.int64),
        spec=QuantSpec("fp4_e2m1", "tensor", None),
    )
    assert fp.dequantize().tolist() == [[1.5, -1.5, 0.125]]
    assert np.isclose(fp.bits_per_weight(), 4 + 32 / 3)


def test_to_moves_every_tensor_field() -> None:
    """``QuantizedWeight.to`` (the runner moves finished layers to the host with it) moves every
    tensor the dataclass holds, optional ones included, and keeps their dtypes."""
    w = torch.randn(8, 16)
    qw = quantize_weight(w, QuantSpec("int4", "group", 8, symmetric=True))
    full = dataclasses.replace(
        qw,
        outlier_idx=torch.tensor([1, 3]),
        outlier_weight=torch.randn(8, 2).half(),
        lorc_u=torch.randn(8, 2),
        lorc_v=torch.randn(2, 16),
    )
    moved = full.to("meta")
    for f in dataclasses.fields(full):
        value = getattr(full, f.name)
        if isinstance(value, torch.Tensor):
            assert getattr(moved, f.name).device.type == "meta", f.name
            assert getattr(moved, f.name).dtype == value.dtype, f.name
    assert moved.spec == full.spec
    assert qw.to("meta").outlier_idx is None
