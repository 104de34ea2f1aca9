"""Bit packing of unpacked integer codes into a dense little-endian bit stream.

Quantized weights are held in memory as one code per element (uint8 or wider). When a file is
written, codes of ``bits`` bits each are packed densely: the codes are flattened row-major and
written LSB-first into a bit stream, so code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``
(bit ``j`` of the code is stream bit ``i*bits + j``), and stream bit ``k`` is bit ``k % 8`` of
byte ``k // 8``. The last byte is padded with zero bits.

Codes are unsigned: a caller with signed codes offsets them into ``[0, 2**bits)`` first.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

__all__ = ["pack_bits", "pack_int32_rows", "packed_nbytes", "unpack_bits"]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"bits must be an integer from 1 to 8, got {bits!r}; choose a bit width in 1..8.")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack ``numel`` codes of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes into a dense LSB-first bit stream.

    Args:
        codes: any shape, any integer dtype; every value in ``[0, 2**bits)``.
        bits: bits per code, 1..8.

    Returns:
        1-D uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes, on ``codes.device``.

    Raises:
        LowbitError: ``bits`` not in 1..8, ``codes`` not an integer dtype, or a value out of range.
    """
    _check_bits(bits)
    if not _is_integer_dtype(codes.dtype):
        raise LowbitError(f"pack_bits needs integer codes, got dtype {codes.dtype}; quantize to integer codes first.")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        raise LowbitError(
            f"codes must lie in [0, {1 << bits}) for bits={bits}, found values in [{lo}, {hi}]; "
            "offset signed codes to be non-negative or use a wider bit width."
        )
    flat = flat.to(torch.uint8)  # every value fits now; all work below stays in bytes
    if bits == 8:
        return flat
    # (n, bits) stream bits, LSB first, padded to whole bytes, then OR-ed 8 at a time
    stream = torch.empty((n * bits + 7) // 8 * 8, dtype=torch.uint8, device=flat.device)
    stream[n * bits :] = 0
    bits_view = stream[: n * bits].view(n, bits)
    for j in range(bits):
        torch.bitwise_and(flat >> j, 1, out=bits_view[:, j])
    octets = stream.view(-1, 8)
    out = octets[:, 0].clone()
    for j in range(1, 8):
        out |= octets[:, j] << j
    return out


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of unsigned ``codes`` (rows, n) into (rows, ceil(n*bits/32)) int32 words.

    Each row is its own LSB-first stream (code ``i`` at bits ``[i*bits, (i+1)*bits)``, word ``k``
    holding stream bits ``32k .. 32k+31``, little-endian whatever the host), padded with zero bits;
    words are two's complement. This is the int32 layout of GPTQ, AWQ and compressed-tensors.
    """
    _check_bits(bits)
    rows, n = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise LowbitError(f"codes must lie in [0, {1 << bits}) for bits={bits}; offset signed codes first.")
    padded = -(-n // 32) * 32  # 32 codes fill exactly `bits` words, so rows stay word-aligned
    full = torch.zeros(rows, padded, dtype=torch.uint8)
    full[:, :n] = codes
    octets = pack_bits(full, bits).to(torch.int64).reshape(rows, -1, 4)
    words = octets[..., 0] | octets[..., 1] << 8 | octets[..., 2] << 16 | octets[..., 3] << 24
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words[:, : -(-n * bits // 32)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 tensor (flattened if not 1-D) of at least ``ceil(numel * bits / 8)`` bytes;
            extra trailing bytes are ignored.
        bits: bits per code, 1..8.
        numel: number of codes to read.

    Returns:
        1-D uint8 tensor of ``numel`` codes, on ``packed.device``.

    Raises:
        LowbitError: ``bits`` not in 1..8, ``packed`` not uint8, ``numel`` negative, or too few bytes.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise LowbitError(f"unpack_bits needs a uint8 tensor, got dtype {packed.dtype}.")
    if numel < 0:
        raise LowbitError(f"numel must be non-negative, got {numel}.")
    needed = packed_nbytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() < needed:
        raise LowbitError(
            f"packed data holds {flat.numel()} bytes but {numel} codes of {bits} bits need {needed}; "
            "the file is truncated or numel/bits do not match what was written."
        )
    if bits == 8:
        return flat[:numel].clone()
    stream = torch.empty(needed * 8, dtype=torch.uint8, device=flat.device)
    octets = stream.view(needed, 8)
    for j in range(8):
        torch.bitwise_and(flat[:needed] >> j, 1, out=octets[:, j])
    bits_view = stream[: numel * bits].view(numel, bits)
    out = bits_view[:, 0].clone()
    for j in range(1, bits):
        out |= bits_view[:, j] << j
    return out
