from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.packing import pack_bits, pack_int32_rows, packed_nbytes, unpack_bits


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """Plain-loop reference: code i's bit j is stream bit k = i*bits + j, i.e. bit k%8 of byte k//8."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for j in range(bits):
            if (c >> j) & 1:
                k = i * bits + j
                out[k // 8] |= 1 << (k % 8)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 64, 1001])
def test_round_trip_and_length(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 10_000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and out.shape == (n,)
    assert torch.equal(out.to(torch.int64), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_python_loop_reference(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in [1, 3, 5, 11, 17, 30]:
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        assert pack_bits(codes, bits).tolist() == reference_pack(codes.tolist(), bits)


def test_hand_worked_example_3_bits() -> None:
    # bits=3, codes [1,2,3,4,5,6,7,0]; each code written LSB-first, 24 stream bits in all:
    #   code:        1     2     3     4     5     6     7     0
    #   its bits:   100   010   110   001   101   011   111   000   (bit 0 first)
    #   stream bits 0..23:  1 0 0 0 1 0 1 1 | 0 0 0 1 1 0 1 0 | 1 1 1 1 1 0 0 0
    #   byte 0 (bits 0..7, bit 0 = LSB): 1 + 16 + 64 + 128 = 209 = 0xD1
    #   byte 1 (bits 8..15): 8 + 16 + 64                   =  88 = 0x58
    #   byte 2 (bits 16..23): 1 + 2 + 4 + 8 + 16            =  31 = 0x1F
    # Cross-check: sum(code_i << 3i) = 2054353 = 0x1F58D1, whose little-endian bytes are D1 58 1F.
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [0xD1, 0x58, 0x1F]
    assert unpack_bits(torch.tensor([0xD1, 0x58, 0x1F], dtype=torch.uint8), 3, 8).tolist() == [
        1, 2, 3, 4, 5, 6, 7, 0,
    ]  # fmt: skip


def test_hand_worked_padding() -> None:
    # bits=4, codes [0xA, 0x3, 0xF] -> bytes 0x3A (low nibble first), 0x0F (high nibble zero padding)
    assert pack_bits(torch.tensor([0xA, 0x3, 0xF]), 4).tolist() == [0x3A, 0x0F]
    # bits=1: codes 1,0,1,1,0 -> 0b01101 = 13 with three zero pad bits
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0]), 1).tolist() == [13]


def test_multidimensional_is_row_major_and_dtypes() -> None:
    codes = torch.randint(0, 32, (3, 5, 7))
    for dtype in [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]:
        packed = pack_bits(codes.to(dtype), 5)
        assert torch.equal(packed, pack_bits(codes.reshape(-1), 5))
    out = unpack_bits(pack_bits(codes, 5), 5, codes.numel()).reshape(codes.shape)
    assert torch.equal(out.long(), codes)


def test_bits8_is_cast() -> None:
    codes = torch.arange(256).reshape(16, 16)
    assert torch.equal(pack_bits(codes, 8), torch.arange(256).to(torch.uint8))


def test_unpack_ignores_trailing_bytes() -> None:
    packed = torch.cat([pack_bits(torch.tensor([1, 2, 3]), 2), torch.tensor([255], dtype=torch.uint8)])
    assert unpack_bits(packed, 2, 3).tolist() == [1, 2, 3]


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(LowbitError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.int64), bits)  # type: ignore[arg-type]
    with pytest.raises(LowbitError, match="bits"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)  # type: ignore[arg-type]


def test_out_of_range_values() -> None:
    with pytest.raises(LowbitError, match=r"\[0, 8\)"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(LowbitError, match="offset signed"):
        pack_bits(torch.tensor([-1, 0], dtype=torch.int8), 4)


def test_non_integer_dtypes() -> None:
    for t in [torch.zeros(3), torch.zeros(3, dtype=torch.float16), torch.zeros(3, dtype=torch.bool)]:
        with pytest.raises(LowbitError, match="integer"):
            pack_bits(t, 2)
    with pytest.raises(LowbitError, match="uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.int64), 2, 3)


def test_unpack_too_short() -> None:
    packed = pack_bits(torch.ones(9, dtype=torch.int64), 3)  # 27 bits -> 4 bytes
    with pytest.raises(LowbitError, match="truncated"):
        unpack_bits(packed[:3], 3, 9)
    with pytest.raises(LowbitError, match="non-negative"):
        unpack_bits(packed, 3, -1)


def test_pack_int32_rows_pads_each_row_to_whole_words() -> None:
    codes = torch.tensor([[1, 2, 3], [15, 0, 15]])
    words = pack_int32_rows(codes, 4)
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert words[:, 0].tolist() == [0x321, 0xF0F]
    top = pack_int32_rows(torch.full((1, 8), 15), 4)  # 0xFFFFFFFF is -1 as a two's complement int32
    assert top.tolist() == [[-1]]
    three = pack_int32_rows(torch.full((1, 11), 7), 3)  # 33 bits: one full word and one bit
    assert three.tolist() == [[-1, 1]]


def test_pack_int32_rows_rejects_out_of_range_codes() -> None:
    with pytest.raises(LowbitError, match=r"\[0, 16\)"):
        pack_int32_rows(torch.tensor([[16]]), 4)
    with pytest.raises(LowbitError, match=r"\[0, 4\)"):
        pack_int32_rows(torch.tensor([[-1]]), 2)
