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

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]


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
    flat = codes.reshape(-1).to(torch.int64)  # unsigned 64-bit values past 2**63 wrap negative: caught below
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        raise LowbitError(
            f"codes must lie in [0, {1 << bits}) for bits={bits}, found values in [{lo}, {hi}]; "
            "offset signed codes to be non-negative or use a wider bit width."
        )
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)  # (n*bits,) stream bits
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=flat.device)
    return (stream.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


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
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    stream = ((flat[:needed].unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = torch.tensor([1 << j for j in range(bits)], dtype=torch.int32, device=flat.device)
    return (stream.reshape(numel, bits).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
