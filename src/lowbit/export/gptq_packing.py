"""Packing of integer codes into the int32 words of the GPTQ and AWQ GEMM layouts.

Both pack unsigned codes LSB first. GPTQ packs along one dimension as a continuous bit stream:
code ``i`` of a column occupies stream bits ``[i*bits, (i+1)*bits)`` and stream bit ``k`` is bit
``k % 32`` of word ``k // 32``, so 3-bit codes cross word boundaries (32 codes fill 3 words),
exactly as AutoGPTQ's reference packer lays them out. AWQ packs eight 4-bit codes per word
along the output dimension, code of output ``8c + AWQ_ORDER[j]`` in bits ``[4j, 4j+4)`` of word
``c``.

The layouts store unsigned codes and float16 scales: :func:`stored_grid` and :func:`fp16_scales`
turn a lowbit :class:`~lowbit.qweight.QuantizedWeight` into them.
"""

from __future__ import annotations

import torch

from lowbit.formats import IntFormat
from lowbit.packing import pack_int32_rows
from lowbit.primitives import group_index
from lowbit.qweight import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of ``codes`` (R, n), values in ``[0, 2**bits)``, into (R, n*bits/32) int32 words.

    ``n * bits`` must be a multiple of 32 (the layouts' loaders read whole words per row).
    """
    assert (codes.shape[1] * bits) % 32 == 0, (codes.shape, bits)
    return pack_int32_rows(codes, bits)


def gptq_pack_input_dim(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight``: codes (out, in) -> (in*bits/32, out), packed along the input dimension."""
    return pack_rows(codes, bits).t().contiguous()


def gptq_pack_output_dim(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qzeros``: zero points (out, G) -> (G, out*bits/32), packed along the output dimension."""
    return pack_rows(zeros.t(), bits)


def awq_pack_output_dim(values: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM: 4-bit values (R, out) -> (R, out/8) int32 in AWQ's interleaved order."""
    out = values.shape[1]
    assert out % 8 == 0, out
    order = torch.tensor(AWQ_ORDER)
    perm = (torch.arange(out).reshape(-1, 8)[:, order]).reshape(-1)
    return pack_rows(values[:, perm], 4)


def stored_grid(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes (out, in) and zero points (out, G) as the layouts store them (int64, ``- qmin``)."""
    fmt = qw.spec.fmt
    assert isinstance(fmt, IntFormat)
    codes = qw.codes.cpu().to(torch.int64) - fmt.qmin
    zeros = torch.round(qw.zero_point.cpu().to(torch.float32)).to(torch.int64) - fmt.qmin
    return codes, zeros.expand(qw.shape[0], zeros.shape[1]).contiguous()


def fp16_scales(qw: QuantizedWeight) -> tuple[torch.Tensor, float]:
    """Scales (out, G) in float16, and the largest relative change of a weight this caused (0: exact)."""
    scale = qw.scale.cpu()
    s16 = scale.to(torch.float16).expand(qw.shape[0], scale.shape[1]).contiguous()
    if scale.dtype == torch.float16 or torch.equal(s16.to(torch.float32), scale.to(torch.float32).expand_as(s16)):
        return s16, 0.0
    old = qw.dequantize().cpu()
    new = (qw.grid_values().cpu() - qw.zero_point.cpu().float()[:, qw.g_idx.cpu()]) * s16.float()[:, qw.g_idx.cpu()]
    nonzero = old != 0
    rel = ((new - old).abs()[nonzero] / old.abs()[nonzero]).max() if nonzero.any() else torch.tensor(0.0)
    return s16, float(rel)


def layout_group_size(qw: QuantizedWeight) -> int:
    """The layouts' group size: -1 for one group per output channel (per-channel or per-tensor)."""
    if qw.spec.granularity == "group" and qw.spec.group_size is not None:
        return qw.spec.group_size
    return -1


def has_act_order(qw: QuantizedWeight) -> bool:
    """Whether ``g_idx`` regroups columns (act-order) rather than being ``i // group_size``."""
    gs = qw.spec.group_size if qw.spec.granularity == "group" else None
    return not torch.equal(qw.g_idx.cpu(), group_index(qw.shape[1], gs))
