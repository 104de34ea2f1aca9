"""Number formats against plain references: integer grids, OCP ExMy grids, rounding, codes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from quant_reference import (
    FLOAT_MAX,
    FLOAT_NAMES,
    FLOAT_SPECS,
    INT_NAMES,
    decode_float,
    float_code,
    float_grid,
    float_round,
    int_range,
    int_round,
    positive_grid,
)

from lowbit.errors import LowbitError
from lowbit.formats import FloatFormat, IntFormat, format_names, get_format

TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# --- integer formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INT_NAMES)
def test_int_range_and_dtype(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, IntFormat) and not fmt.is_float
    assert fmt.name == name
    bits = int(name[4:] if name.startswith("uint") else name[3:])
    assert fmt.bits == bits
    assert (fmt.qmin, fmt.qmax) == int_range(name)
    assert fmt.code_dtype == (torch.uint8 if name.startswith("uint") else torch.int8)


def test_int_ranges_hand_written() -> None:
    expect = {"int2": (-2, 1), "int4": (-8, 7), "int8": (-128, 127), "uint2": (0, 3), "uint8": (0, 255)}
    for name, rng in expect.items():
        fmt = get_format(name)
        assert (fmt.qmin, fmt.qmax) == rng


@pytest.mark.parametrize("name", INT_NAMES)
def test_int_round_half_even_and_saturate(name: str) -> None:
    fmt = get_format(name)
    qmin, qmax = int_range(name)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    halves = torch.arange(2 * qmin - 6, 2 * qmax + 7, dtype=torch.float32) / 2  # every .5 step, beyond
    rand = (torch.rand(3000, generator=g) * (qmax - qmin + 8) + qmin - 4).float()
    special = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), 0.49999997, -0.49999997])
    x = torch.cat([halves, rand, special])
    out = fmt.round(x)
    ref = torch.tensor([float(int_round(v, qmin, qmax)) for v in x.tolist()])
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    # hand-checked ties: 0.5 -> 0, 1.5 -> 2, -0.5 -> 0, -1.5 -> -2 (inside every grid that holds them)
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    want = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0]).clamp(qmin, qmax)
    assert torch.equal(fmt.round(ties), want)


@pytest.mark.parametrize("name", INT_NAMES)
def test_int_codes_round_trip(name: str) -> None:
    fmt = get_format(name)
    qmin, qmax = int_range(name)
    q = torch.arange(qmin, qmax + 1, dtype=torch.float32)
    codes = fmt.to_codes(q)
    assert codes.dtype == fmt.code_dtype
    assert codes.tolist() == list(range(qmin, qmax + 1))
    back = fmt.from_codes(codes)
    assert back.dtype == torch.float32 and torch.equal(back, q)


def test_int_round_does_not_modify_input() -> None:
    x = torch.tensor([0.5, 300.0, -300.0])
    keep = x.clone()
    get_format("int8").round(x)
    assert torch.equal(x, keep)


# --- float formats: the grid -----------------------------------------------------------------------


def test_reference_grid_sanity() -> None:
    # the test's own decoder on a few hand-known patterns
    assert decode_float("fp8_e4m3", 0x7E) == 448.0 and decode_float("fp8_e4m3", 0x7F) is None
    assert decode_float("fp8_e4m3", 0x01) == 2.0**-9 and decode_float("fp8_e4m3", 0x08) == 2.0**-6
    assert decode_float("fp8_e5m2", 0x7B) == 57344.0 and decode_float("fp8_e5m2", 0x7C) is None
    assert decode_float("fp8_e5m2", 0x01) == 2.0**-16
    assert [decode_float("fp4_e2m1", c) for c in range(8)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert decode_float("fp4_e2m1", 0xF) == -6.0
    assert decode_float("fp6_e3m2", 0x1F) == 28.0 and decode_float("fp6_e3m2", 0x01) == 0.0625
    assert decode_float("fp6_e2m3", 0x1F) == 7.5 and decode_float("fp6_e2m3", 0x01) == 0.125


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_grid_matches_enumeration(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, FloatFormat) and fmt.is_float and fmt.name == name
    grid = fmt.grid()
    assert grid.dtype == torch.float32
    ref = float_grid(name)
    assert grid.tolist() == ref
    assert max(ref) == FLOAT_MAX[name] == fmt.max_value == fmt.qmax == -fmt.qmin
    assert all(math.isfinite(v) for v in grid.tolist())
    # sizes: all encodings, minus the reserved ones, minus the duplicate zero
    ebits, mbits = fmt.ebits, fmt.mbits
    reserved = {"fp8_e4m3": 2, "fp8_e5m2": 2 * 4}.get(name, 0)
    assert grid.numel() == 2 ** (1 + ebits + mbits) - reserved - 1
    assert fmt.bits == 1 + ebits + mbits


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_from_codes_every_code(name: str) -> None:
    fmt = get_format(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.int64).to(torch.uint8)
    out = fmt.from_codes(codes)
    assert out.dtype == torch.float32
    for c, v in zip(range(2**fmt.bits), out.tolist(), strict=True):
        ref = decode_float(name, c)
        if ref is None:
            assert math.isnan(v), (c, v)
        else:
            assert v == ref, (c, v, ref)


# --- float formats: rounding -----------------------------------------------------------------------


def _float_test_values(name: str, seed: int) -> torch.Tensor:
    """Random values of every magnitude, exact grid points, exact midpoints and their neighbours."""
    g = torch.Generator().manual_seed(seed)
    mx = FLOAT_MAX[name]
    pos = list(positive_grid(name)[0])
    tiny = pos[1]  # smallest subnormal
    uniform = (torch.rand(2000, generator=g) * 2 - 1) * 1.3 * mx
    logmag = torch.exp2(torch.rand(3000, generator=g) * (math.log2(mx * 8) - math.log2(tiny / 8)))
    logmag = logmag * (tiny / 8) * torch.where(torch.rand(3000, generator=g) < 0.5, -1.0, 1.0)
    smallest_normal = pos[2 ** FLOAT_SPECS[name][1]]  # codes 1 .. 2**mbits - 1 are the subnormals
    subnormal = (torch.rand(500, generator=g) * 2 - 1) * smallest_normal
    mids = [(a + b) / 2 for a, b in itertools.pairwise(pos)]
    mids += [pos[-1] + (pos[-1] - pos[-2]) / 2]  # the midpoint above the max: saturates
    exact = torch.tensor(pos + mids, dtype=torch.float32)
    assert exact.tolist() == pos + mids  # midpoints are exact in float32
    up = torch.nextafter(exact, torch.tensor(float("inf")))
    down = torch.nextafter(exact, torch.tensor(float("-inf")))
    special = torch.tensor([0.0, -0.0, mx, -mx, mx * 1.01, 1e30, -1e30, 3e38, float("inf"), float("-inf")])
    one_side = torch.cat([exact, up, down])
    return torch.cat([uniform, logmag, subnormal, one_side, -one_side, special]).float()


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_round_matches_nearest_even_reference(name: str) -> None:
    fmt = get_format(name)
    x = _float_test_values(name, seed=len(name) * 7 + fmt.bits)
    out = fmt.round(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = [float_round(v, name) for v in x.tolist()]
    got = out.tolist()
    bad = [(v, a, b) for v, a, b in zip(x.tolist(), got, ref, strict=True) if a != b]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:5]}"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_round_ties_go_to_even_code(name: str) -> None:
    # every midpoint between neighbours: the result is the neighbour with the even code
    fmt = get_format(name)
    vals, codes = positive_grid(name)
    for i in range(len(vals) - 1):
        mid = (vals[i] + vals[i + 1]) / 2
        want = vals[i] if codes[i] % 2 == 0 else vals[i + 1]
        assert codes[i] % 2 != codes[i + 1] % 2
        got = fmt.round(torch.tensor([mid, -mid])).tolist()
        assert got == [want, -want], (mid, got, want)


def test_float_round_hand_examples() -> None:
    fp4 = get_format("fp4_e2m1")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 7.0, 100.0, -0.25, -5.0, 0.2])
    assert fp4.round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.0, -4.0, 0.0]
    e4m3 = get_format("fp8_e4m3")
    # 464 is the midpoint of 448 and (non-existent) 480: saturates; 2**-10 is half the smallest subnormal
    y = torch.tensor([464.0, 1000.0, 2.0**-10, 3 * 2.0**-10, 17.0, 19.0])
    assert e4m3.round(y).tolist() == [448.0, 448.0, 0.0, 2.0**-8, 16.0, 20.0]
    e5m2 = get_format("fp8_e5m2")
    assert e5m2.round(torch.tensor([60000.0, 1e6, 2.0**-17])).tolist() == [57344.0, 57344.0, 0.0]


@pytest.mark.parametrize("name", list(TORCH_FP8))
def test_fp8_round_matches_torch_cast(name: str) -> None:
    fmt = get_format(name)
    mx = FLOAT_MAX[name]
    x = _float_test_values(name, seed=99).clamp(-mx, mx)  # torch's cast does not saturate
    ref = x.to(TORCH_FP8[name]).float()
    assert torch.equal(fmt.round(x), ref)


# --- float formats: codes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_codes_round_trip(name: str) -> None:
    fmt = get_format(name)
    grid = fmt.grid()
    codes = fmt.to_codes(grid)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [float_code(v, name) for v in grid.tolist()]
    assert torch.equal(fmt.from_codes(codes), grid)
    # every finite code decodes and re-encodes to itself, except -0 which encodes as +0
    all_codes = torch.arange(2**fmt.bits).to(torch.uint8)
    vals = fmt.from_codes(all_codes)
    finite = ~torch.isnan(vals)
    back = fmt.to_codes(vals[finite])
    neg_zero = 1 << (fmt.ebits + fmt.mbits)
    want = [0 if c == neg_zero else c for c in all_codes[finite].tolist()]
    assert back.tolist() == want
    # rounded random values always encode
    x = _float_test_values(name, seed=5)
    q = fmt.round(x)
    assert torch.equal(fmt.from_codes(fmt.to_codes(q)), q)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_to_codes_rejects_off_grid(name: str) -> None:
    fmt = get_format(name)
    off = (fmt.grid()[-1] + fmt.grid()[-2]) / 2
    with pytest.raises(ValueError, match="grid"):
        fmt.to_codes(torch.tensor([0.0, float(off)]))
    with pytest.raises(ValueError):
        fmt.to_codes(torch.tensor([float("nan")]))


@pytest.mark.parametrize("name", list(TORCH_FP8))
def test_fp8_codes_equal_torch_bit_patterns(name: str) -> None:
    fmt = get_format(name)
    dt = TORCH_FP8[name]
    grid = fmt.grid()
    nonzero = grid[grid != 0]
    assert (nonzero < 0).any() and (nonzero > 0).any()
    assert torch.equal(fmt.to_codes(nonzero), nonzero.to(dt).view(torch.uint8))
    # zero: lowbit writes +0 for both 0.0 and -0.0 (torch keeps the sign of -0.0)
    assert fmt.to_codes(torch.tensor([0.0, -0.0])).tolist() == [0, 0]
    assert torch.tensor([0.0]).to(dt).view(torch.uint8).tolist() == [0]
    # decoding every bit pattern agrees with torch where torch's value is finite
    codes = torch.arange(256).to(torch.uint8)
    theirs = codes.view(dt).float()
    ours = fmt.from_codes(codes)
    fin = torch.isfinite(theirs)
    assert torch.equal(ours[fin], theirs[fin])
    assert torch.isnan(ours[~fin]).all()
    # random in-range values, rounded, encode to torch's bits (except zeros, see above)
    x = _float_test_values(name, seed=11).clamp(-fmt.max_value, fmt.max_value)
    q = fmt.round(x)
    keep = q != 0
    assert torch.equal(fmt.to_codes(q[keep]), x[keep].to(dt).view(torch.uint8))


# --- lookup ----------------------------------------------------------------------------------------


def test_format_names_all_resolve() -> None:
    names = format_names()
    assert sorted(names) == sorted(INT_NAMES + FLOAT_NAMES)
    for n in names:
        assert get_format(n).name == n


@pytest.mark.parametrize(
    "bad",
    ["int1", "int9", "uint1", "uint16", "int", "uint", "", "fp8", "INT4", "int4 ", " int4", "fp8_e4m3fn",
     "fp8_e4m3fnuz", "e4m3", "float8", "int-4", "int04", "int²", "int٤", "nf4", "bfloat16"],
)  # fmt: skip
def test_get_format_rejects_bad_names(bad: str) -> None:
    with pytest.raises(LowbitError, match="unknown number format"):
        get_format(bad)


def test_get_format_error_lists_choices() -> None:
    with pytest.raises(LowbitError) as e:
        get_format("fp8_e4m4")
    msg = str(e.value)
    assert "'fp8_e4m4'" in msg and "fp8_e4m3" in msg and "int2..int8" in msg


def test_float_round_accepts_other_dtypes() -> None:
    fmt = get_format("fp8_e4m3")
    x = torch.tensor([0.3, -17.0, 500.0], dtype=torch.float64)
    assert fmt.round(x).dtype == torch.float32
    assert fmt.round(x.half()).tolist() == [float_round(float(np.float16(v)), "fp8_e4m3") for v in x.tolist()]
