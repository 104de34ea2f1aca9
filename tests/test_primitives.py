"""quantize / qparams / fake quantize against ONNX's reference evaluator and plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from quant_reference import (
    F32,
    FLOAT_MAX,
    dequantize_ref,
    float_code,
    fmt_info,
    int_range,
    qparams_ref,
    quantize_ref,
)

from lowbit.formats import get_format
from lowbit.primitives import (
    dequantize,
    fake_quantize,
    fake_quantize_range,
    group_index,
    per_token_fake_quantize,
    qparams,
    quantize,
)

ONNX_INT = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "uint4": TensorProto.UINT4,
            "int4": TensorProto.INT4}  # fmt: skip
ONNX_FLOAT = {
    "fp8_e4m3": TensorProto.FLOAT8E4M3FN,
    "fp8_e5m2": TensorProto.FLOAT8E5M2,
    "fp6_e3m2": TensorProto.FLOAT6E3M2,
    "fp6_e2m3": TensorProto.FLOAT6E2M3,
    "fp4_e2m1": TensorProto.FLOAT4E2M1,
}
NP_INT = {"uint8": np.uint8, "int8": np.int8}


# --- ONNX helpers ----------------------------------------------------------------------------------


def _quantize_linear(out_type: int, axis: int = 1, with_zp: bool = True, opset: int = 21) -> ReferenceEvaluator:
    inputs = ["x", "scale", "zp"] if with_zp else ["x", "scale"]
    attrs: dict[str, int] = {"axis": axis, "saturate": 1}
    if not with_zp:
        attrs["output_dtype"] = out_type
    node = helper.make_node("QuantizeLinear", inputs, ["y"], **attrs)
    vi = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
          helper.make_tensor_value_info("scale", TensorProto.FLOAT, None)]  # fmt: skip
    if with_zp:
        vi.append(helper.make_tensor_value_info("zp", out_type, None))
    graph = helper.make_graph([node], "q", vi, [helper.make_tensor_value_info("y", out_type, None)])
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _dynamic_quantize_linear() -> ReferenceEvaluator:
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    graph = helper.make_graph(
        [node],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, None),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zp", TensorProto.UINT8, []),
        ],
    )
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _onnx_zp(values: np.ndarray, name: str) -> np.ndarray:
    """Zero points as the numpy dtype ONNX expects for ``name`` (ml_dtypes for 4-bit)."""
    if name in NP_INT:
        return values.astype(NP_INT[name])
    import ml_dtypes

    return values.astype(ml_dtypes.int4 if name == "int4" else ml_dtypes.uint4)


def _lowbit_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmt = get_format("uint8")
    scale, zp = qparams(x.min().reshape(1), x.max().reshape(1), fmt, symmetric=False)
    return quantize(x, scale, zp, fmt), scale, zp


def _ties_and_random(g: torch.Generator, n: int, scale: float, span: int) -> torch.Tensor:
    """Exact .5 steps of ``scale`` (x / scale is an exact tie) mixed with random values.

    Out-of-range values stay within int32 after division: ONNX's reference casts to int32 before
    it saturates (larger values are checked against the plain reference elsewhere)."""
    ties = (torch.randint(-span, span, (n,), generator=g).float() + 0.5) * scale
    rand = (torch.rand(n, generator=g) * 2 - 1) * span * scale
    return torch.cat([ties, rand, torch.tensor([0.0, -0.0, 1e6, -1e6])])


# --- QuantizeLinear --------------------------------------------------------------------------------


def test_onnx_doc_example_per_tensor() -> None:
    x = np.array([0, 2, 3, 1000, -254, -1000], dtype=np.float32)
    want = [128, 129, 130, 255, 1, 0]
    ref = _quantize_linear(TensorProto.UINT8).run(None, {"x": x, "scale": F32(2), "zp": np.uint8(128)})[0]
    assert ref.tolist() == want
    q = quantize(torch.from_numpy(x), torch.tensor(2.0), torch.tensor(128.0), get_format("uint8"))
    assert q.tolist() == want


def test_onnx_doc_example_axis() -> None:
    x = np.array(
        [[[[-162, 10], [-100, 232], [-20, -50]],
          [[-76, 0], [0, 252], [32, -44]],
          [[245, -485], [-960, -270], [-375, -470]]]],
        dtype=np.float32,
    )  # fmt: skip
    scale = np.array([2, 4, 5], dtype=np.float32)
    zp = np.array([84, 24, 196], dtype=np.uint8)
    want = [[[[3, 89], [34, 200], [74, 59]],
             [[5, 24], [24, 87], [32, 13]],
             [[245, 99], [4, 142], [121, 102]]]]  # fmt: skip
    ref = _quantize_linear(TensorProto.UINT8, axis=1).run(None, {"x": x, "scale": scale, "zp": zp})[0]
    assert ref.tolist() == want
    q = quantize(
        torch.from_numpy(x),
        torch.from_numpy(scale).view(1, 3, 1, 1),
        torch.from_numpy(zp).float().view(1, 3, 1, 1),
        get_format("uint8"),
    )
    assert q.tolist() == want


@pytest.mark.parametrize("name", list(ONNX_INT))
@pytest.mark.parametrize("scale", [0.25, 2.0, 0.0371, 3.3])
def test_quantize_per_tensor_matches_onnx(name: str, scale: float) -> None:
    qmin, qmax = int_range(name)
    g = torch.Generator().manual_seed(int(scale * 1000) + qmax)
    x = _ties_and_random(g, 400, scale, span=(qmax - qmin))
    fmt = get_format(name)
    for zp in {qmin, 0 if qmin < 0 else qmax // 2 + 1, qmax, (qmin + qmax) // 3}:
        feeds = {"x": x.numpy(), "scale": F32(scale), "zp": _onnx_zp(np.array(zp), name)}
        ref = _quantize_linear(ONNX_INT[name]).run(None, feeds)[0].astype(np.float32)
        q = quantize(x, torch.tensor(scale), torch.tensor(float(zp)), fmt)
        assert q.dtype == torch.float32
        assert np.array_equal(q.numpy(), ref), (name, scale, zp)
        # the same, element by element, from the plain reference
        assert q.tolist() == [quantize_ref(v, F32(scale), zp, name) for v in x.tolist()]


@pytest.mark.parametrize("name", list(ONNX_INT))
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_quantize_per_axis_matches_onnx(name: str, axis: int) -> None:
    qmin, qmax = int_range(name)
    g = torch.Generator().manual_seed(31 * axis + qmax)
    shape = [3, 5, 4]
    n = shape[axis]
    scale = torch.tensor([0.5, 0.125, 0.0371, 1.7, 0.25][:n])
    zp = torch.randint(qmin, qmax + 1, (n,), generator=g).float()
    bshape = [1, 1, 1]
    bshape[axis] = n
    ties = (torch.randint(-qmax - 4, qmax + 4, shape, generator=g).float() + 0.5) * scale.view(bshape)
    rand = torch.randn(shape, generator=g) * qmax * scale.view(bshape)
    x = torch.cat([ties, rand], dim=(axis + 1) % 3)
    feeds = {"x": x.numpy(), "scale": scale.numpy(), "zp": _onnx_zp(zp.numpy().astype(np.int64), name)}
    ref = _quantize_linear(ONNX_INT[name], axis=axis).run(None, feeds)[0].astype(np.float32)
    q = quantize(x, scale.view(bshape), zp.view(bshape), get_format(name))
    assert np.array_equal(q.numpy(), ref)


def test_quantize_saturates_and_rounds_half_even_by_hand() -> None:
    fmt = get_format("int8")
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 127.5, 128.0, -128.5, -129.0, 1e30, -1e30])
    q = quantize(x, torch.tensor(1.0), torch.tensor(0.0), fmt)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, 127, -128, -128, 127, -128]
    fmt_u = get_format("uint8")
    q = quantize(x, torch.tensor(1.0), torch.tensor(3.0), fmt_u)
    assert q.tolist() == [3, 5, 5, 3, 1, 131, 131, 0, 0, 255, 0]


@pytest.mark.parametrize("name", list(ONNX_FLOAT))
def test_float_quantize_matches_onnx(name: str) -> None:
    fmt = get_format(name)
    mx = FLOAT_MAX[name]
    g = torch.Generator().manual_seed(len(name))
    scale = 0.0371
    grid = fmt.grid().double()
    mids = ((grid[1:] + grid[:-1]) / 2) * scale  # near-ties after division by a non-power-of-two scale
    x = torch.cat([
        (torch.rand(3000, generator=g) * 2 - 1) * mx * scale * 1.2,
        torch.exp2(torch.rand(2000, generator=g) * 30 - 25) * torch.sign(torch.randn(2000, generator=g)),
        mids.float(), torch.tensor([0.0, 1e9, -1e9]),
    ]).float()  # fmt: skip
    sess = _quantize_linear(ONNX_FLOAT[name], with_zp=False, opset=25)
    for s in (scale, 0.25, 1.0):
        ref = sess.run(None, {"x": x.numpy(), "scale": F32(s)})[0]
        q = quantize(x, torch.tensor(s), torch.tensor(0.0), fmt)
        assert np.array_equal(q.numpy(), ref.astype(np.float32)), (name, s)
        # the bit patterns too (ONNX keeps the sign of a negative zero, lowbit writes +0)
        keep = q.numpy() != 0
        ref_bits = ref.view(np.uint8)[keep]
        assert np.array_equal(fmt.to_codes(q).numpy()[keep], ref_bits)


def test_onnx_doc_examples_fp8() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 100000.0, 200.0])
    assert quantize(x, torch.tensor(2.0), torch.tensor(0.0), get_format("fp8_e4m3")).tolist() == [
        0, 0.5, 1, 448, 96,
    ]  # fmt: skip
    assert quantize(x, torch.tensor(2.0), torch.tensor(0.0), get_format("fp8_e5m2")).tolist() == [
        0, 0.5, 1, 49152, 96,
    ]  # fmt: skip


# --- DynamicQuantizeLinear -------------------------------------------------------------------------

DYNAMIC_DOC_EXAMPLES = [
    ([0, 2, -3, -2.5, 1.34, 0.5], [153, 255, 0, 26, 221, 179], 153),
    ([-1.0, -2.1, -1.3, -2.5, -3.34, -4.0], [191, 121, 172, 96, 42, 0], 255),
    ([1, 2.1, 1.3, 2.5, 3.34, 4.0, 1.5, 2.6, 3.9, 4.0, 3.0, 2.345],
     [64, 134, 83, 159, 213, 255, 96, 166, 249, 255, 191, 149], 0),
]  # fmt: skip


@pytest.mark.parametrize(("x", "want_y", "want_zp"), DYNAMIC_DOC_EXAMPLES)
def test_dynamic_quantize_linear_doc_examples(x: list[float], want_y: list[int], want_zp: int) -> None:
    xs = np.array(x, dtype=np.float32)
    y_ref, s_ref, zp_ref = _dynamic_quantize_linear().run(None, {"x": xs})
    assert y_ref.tolist() == want_y and int(zp_ref) == want_zp
    y, scale, zp = _lowbit_dynamic(torch.from_numpy(xs))
    assert y.tolist() == want_y
    assert zp.item() == want_zp
    assert scale.item() == float(s_ref)
    # the documented scales: (2 - -3) / 255 for the first example, (0 - -4) / 255 and (4 - 0) / 255 after
    assert scale.item() == float(F32(F32(5.0) / F32(255)) if want_zp == 153 else F32(F32(4.0) / F32(255)))
    assert abs(scale.item() - (0.0196078438 if want_zp == 153 else 0.0156862754)) < 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_quantize_linear_random(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 257
    kind = seed % 4
    x = torch.randn(n, generator=g) * float(torch.exp2(torch.rand(1, generator=g) * 20 - 10))
    if kind == 1:
        x = x.abs() + 0.1  # all positive: the range is widened down to 0
    elif kind == 2:
        x = -x.abs() - 0.1  # all negative: widened up to 0
    elif kind == 3:
        x = torch.round(x * 4) / 4  # many repeated values
    y_ref, s_ref, zp_ref = _dynamic_quantize_linear().run(None, {"x": x.numpy()})
    y, scale, zp = _lowbit_dynamic(x)
    assert scale.dtype == torch.float32 and scale.item() == float(s_ref)
    assert zp.item() == int(zp_ref)
    assert np.array_equal(y.numpy(), y_ref.astype(np.float32))
    # ... and zero is exactly representable
    assert dequantize(quantize(torch.zeros(1), scale, zp, get_format("uint8")), scale, zp).item() == 0.0


# --- qparams ---------------------------------------------------------------------------------------

ALL_INT = [f"{p}{b}" for p in ("int", "uint") for b in range(2, 9)]
ALL_FLOAT = list(FLOAT_MAX)


def _random_ranges(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g) * torch.exp2(torch.rand(n, generator=g) * 40 - 20)
    b = torch.randn(n, generator=g) * torch.exp2(torch.rand(n, generator=g) * 40 - 20)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    width = hi - lo
    lo[:20] = lo[:20].abs()  # some ranges entirely above 0
    hi[:20] = lo[:20] + width[:20]
    hi[20:40] = -hi[20:40].abs()  # some entirely below
    lo[20:40] = hi[20:40] - width[20:40]
    assert (lo <= hi).all()
    return lo, hi


@pytest.mark.parametrize("name", ALL_INT + ALL_FLOAT)
def test_symmetric_qparams(name: str) -> None:
    fmt = get_format(name)
    lo, hi = _random_ranges(len(name) + fmt.bits)
    scale, zp = qparams(lo, hi, fmt, symmetric=True)
    assert scale.dtype == torch.float32 and zp.dtype == torch.float32
    want_zp = 2 ** (fmt.bits - 1) if name.startswith("uint") else 0
    q_pos = {"int4": 7.5, "int8": 127.5, "uint4": 7.5, "uint8": 127.5, "fp8_e4m3": 448, "fp4_e2m1": 6}.get(name)
    for i in range(len(lo)):
        s_ref, zp_ref = qparams_ref(lo[i].item(), hi[i].item(), name, True)
        assert scale[i].item() == float(s_ref) and zp[i].item() == zp_ref == want_zp
        if q_pos is not None:
            absmax = max(abs(lo[i].item()), abs(hi[i].item()))
            assert scale[i].item() == float(F32(absmax) / F32(q_pos))
    # nothing clips: the range's ends quantize inside the grid
    q = quantize(torch.stack([lo, hi], 1), scale[:, None], zp[:, None], fmt)
    _, qmin, qmax = fmt_info(name)
    assert (q >= qmin).all() and (q <= qmax).all()


@pytest.mark.parametrize("name", ALL_INT)
def test_asymmetric_qparams(name: str) -> None:
    fmt = get_format(name)
    qmin, qmax = int_range(name)
    lo, hi = _random_ranges(100 + fmt.bits)
    scale, zp = qparams(lo, hi, fmt, symmetric=False)
    for i in range(len(lo)):
        s_ref, zp_ref = qparams_ref(lo[i].item(), hi[i].item(), name, False)
        assert (scale[i].item(), zp[i].item()) == (float(s_ref), zp_ref)
        # the range widened to contain 0: scale covers max(hi, 0) - min(lo, 0)
        lo_w, hi_w = min(lo[i].item(), 0.0), max(hi[i].item(), 0.0)
        assert scale[i].item() == float(F32(F32(hi_w) - F32(lo_w)) / F32(qmax - qmin))
    assert ((zp >= qmin) & (zp <= qmax) & (zp == zp.round())).all()
    # zero is exactly representable: dequantize(quantize(0)) == 0 for every group
    zeros = torch.zeros_like(scale)
    assert torch.equal(fake_quantize(zeros, scale, zp, fmt), zeros)
    for sd in ("float16", "bfloat16", "pow2"):
        s2, z2 = qparams(lo, hi, fmt, symmetric=False, scale_dtype=sd)
        assert torch.equal(fake_quantize(zeros, s2, z2, fmt), zeros)


def test_asymmetric_float_format_is_refused() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        qparams(torch.tensor([-1.0]), torch.tensor([1.0]), get_format("fp8_e4m3"), symmetric=False)


@pytest.mark.parametrize("name", ["int4", "uint4", "int8", "uint8", "fp8_e4m3", "fp4_e2m1"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16", "pow2"])
def test_all_zero_group(name: str, symmetric: bool, scale_dtype: str) -> None:
    fmt = get_format(name)
    if fmt.is_float and not symmetric:
        return
    x = torch.zeros(3, 8)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale, _ = qparams(lo, hi, fmt, symmetric, scale_dtype)
    assert torch.equal(scale, torch.ones(3, 1))
    out = fake_quantize_range(x, lo, hi, fmt, symmetric, scale_dtype)
    assert torch.equal(out, x) and not torch.isnan(out).any()


@pytest.mark.parametrize(("scale_dtype", "dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("name", ["int4", "uint8", "fp8_e4m3"])
def test_narrow_scale_dtypes_are_exact(scale_dtype: str, dtype: torch.dtype, name: str) -> None:
    fmt = get_format(name)
    lo, hi = _random_ranges(7)
    lo, hi = lo / 1e3, hi / 1e3  # keep float16 scales away from its underflow
    for symmetric in (True, False) if not fmt.is_float else (True,):
        scale, zp = qparams(lo, hi, fmt, symmetric, scale_dtype)
        assert scale.dtype == torch.float32
        assert torch.equal(scale.to(dtype).to(torch.float32), scale)  # representable in the dtype
        for i in range(len(lo)):
            s_ref, zp_ref = qparams_ref(lo[i].item(), hi[i].item(), name, symmetric, scale_dtype)
            assert (scale[i].item(), zp[i].item()) == (float(s_ref), zp_ref)


def test_float16_scale_overflow_saturates() -> None:
    scale, _ = qparams(torch.tensor([-1e9]), torch.tensor([1e9]), get_format("int8"), True, "float16")
    assert scale.item() == 65504.0


@pytest.mark.parametrize("name", ["int2", "int4", "uint4", "int8", "fp4_e2m1", "fp8_e4m3"])
def test_pow2_scales(name: str) -> None:
    fmt = get_format(name)
    lo, hi = _random_ranges(3)
    # adversarial: float32 scales one ulp above / below a power of two (int2: q_pos is 1.5)
    is_float, qmin, qmax = fmt_info(name)
    q_pos = qmax if is_float else (qmax - qmin) / 2
    edge = torch.tensor([2.0**k for k in range(-12, 13)])
    edge = torch.cat([edge, torch.nextafter(edge, edge * 2), torch.nextafter(edge, edge / 2)])
    hi = torch.cat([hi, edge * q_pos])
    lo = torch.cat([lo, -edge * q_pos])
    s32, _ = qparams(lo, hi, fmt, True, "float32")
    s2, _ = qparams(lo, hi, fmt, True, "pow2")
    assert s2.dtype == torch.float32
    mant, _ = torch.frexp(s2)
    assert (mant == 0.5).all()  # powers of two
    bad = s2 < s32
    assert not bad.any(), f"pow2 scale below the float32 scale (range clipped): {s32[bad].tolist()[:4]}"
    assert (s2 < 2 * s32).all()  # the smallest such power
    for i in range(len(lo)):
        assert s2[i].item() == float(qparams_ref(lo[i].item(), hi[i].item(), name, True, "pow2")[0])


# --- per-token fake quantization -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "symmetric"), [("int8", True), ("int8", False), ("uint8", False), ("int4", True),
                            ("uint4", True), ("fp8_e4m3", True), ("fp4_e2m1", True)],
)  # fmt: skip
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "pow2"])
def test_per_token_fake_quantize_matches_row_loop(name: str, symmetric: bool, scale_dtype: str) -> None:
    g = torch.Generator().manual_seed(len(name) * 3 + symmetric)
    x = torch.randn(2, 5, 24, generator=g) * torch.exp2(torch.randint(-6, 6, (2, 5, 1), generator=g).float())
    x[0, 1] = 0.0  # an all-zero token
    x[1, 2] = torch.round(x[1, 2] * 2) / 2  # ties for the rounding
    x[1, 3] = x[1, 3].abs() + 1  # all positive
    out = per_token_fake_quantize(x, get_format(name), symmetric, scale_dtype)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = []
    for row in x.reshape(-1, 24).tolist():
        s, zp = qparams_ref(min(row), max(row), name, symmetric, scale_dtype)
        ref.append([dequantize_ref(quantize_ref(v, s, zp, name), s, zp) for v in row])
    assert out.reshape(-1, 24).tolist() == ref
    assert torch.equal(out[0, 1], torch.zeros(24))


def test_per_token_accepts_half_input() -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).half()
    out = per_token_fake_quantize(x, get_format("int8"), True, "float32")
    assert out.dtype == torch.float32
    assert torch.equal(out, per_token_fake_quantize(x.float(), get_format("int8"), True, "float32"))


# --- small helpers ---------------------------------------------------------------------------------


def test_dequantize_formula() -> None:
    q = torch.tensor([0.0, 3.0, 15.0])
    out = dequantize(q, torch.tensor(0.5), torch.tensor(3.0))
    assert out.tolist() == [-1.5, 0.0, 6.0]


def test_group_index() -> None:
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert group_index(5, None).tolist() == [0] * 5
    assert group_index(100, 32).tolist() == [i // 32 for i in range(100)]


def test_reference_helpers_sanity() -> None:
    # the plain references themselves on hand-worked numbers
    assert quantize_ref(2.5, F32(1.0), 0, "int8") == 2.0
    assert quantize_ref(3.5, F32(1.0), 0, "int8") == 4.0
    assert quantize_ref(-1000.0, F32(2.0), 128, "uint8") == 0.0
    assert quantize_ref(0.75, F32(1.0), 0, "fp4_e2m1") == 1.0
    assert float_code(-6.0, "fp4_e2m1") == 0xF
    s, zp = qparams_ref(-3.0, 2.0, "uint8", False)
    assert (float(s), zp) == (float(F32(5.0) / F32(255.0)), 153)
    assert math.isclose(float(s), 0.0196078438, rel_tol=1e-8)
