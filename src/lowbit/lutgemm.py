"""LUT-GEMM (Park et al., 2022): ``y = W x`` for BCQ weights by table look-ups, a CPU torch reference.

For each group of ``mu`` consecutive activations (8 in the paper) the ``2^mu`` signed sums
``sum_k (+-x_k)`` are computed once per input (the table); each bit-plane of each weight row
indexes that table with its ``mu`` bits over the same columns (the key), so a row's product with
one plane is ``C = in / mu`` look-ups instead of ``in`` multiply-adds. The look-ups of a quantization
group are summed, scaled by that group's ``alpha_i`` and summed over planes and groups; the
offset adds ``z * sum(x_group)``.

Keys are computed once per weight (:func:`lut_keys`: (q, out, C) int64 indices into the
flattened table, ``c * 2^mu + pattern``); :class:`LutGemm` holds them and is what
``QuantLinear.lut`` calls; :func:`use_lutgemm` turns it on for every BCQ layer of a model.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.bcq import BCQWeight
from lowbit.errors import LowbitError
from lowbit.modules import QuantLinear

DEFAULT_MU = 8


def check_mu(mu: int, group_size: int) -> None:
    if not isinstance(mu, int) or not 1 <= mu <= 12:
        raise LowbitError(f"LUT-GEMM's mu (activations per table) must be 1..12, got {mu!r}")
    if group_size % mu:
        raise LowbitError(
            f"LUT-GEMM needs mu ({mu}) to divide the BCQ group size ({group_size}); choose mu among its divisors"
        )


def lut_tables(x: torch.Tensor, mu: int) -> torch.Tensor:
    """Every signed sum of each ``mu`` activations: x (B, in) -> (B, in / mu, 2^mu).

    ``table[b, c, p] = sum_k s_k(p) x[b, c*mu + k]`` with ``s_k(p) = +1`` where bit ``k`` of ``p``
    is set, else ``-1``. Built as the paper does, by doubling: start from ``-sum(x)`` and for each
    ``k`` append the table so far plus ``2 x_k`` (``2^mu`` additions per group, no products).
    """
    b, inp = x.shape
    chunks = x.reshape(b, inp // mu, mu)
    table = -chunks.sum(dim=2, keepdim=True)  # pattern 0: every sign negative
    for k in range(mu):
        table = torch.cat([table, table + 2 * chunks[:, :, k : k + 1]], dim=2)
    return table


def lut_keys(codes: torch.Tensor, bits: int, mu: int) -> torch.Tensor:
    """Each bit-plane's ``mu``-bit patterns as indices into the flattened tables.

    codes (out, in) -> (q, out, in / mu) int64: ``c * 2^mu + sum_k 2^k bit_i(codes[o, c*mu + k])``.
    """
    out, inp = codes.shape
    chunks = codes.to(torch.int64).reshape(out, inp // mu, mu)
    weights = 2 ** torch.arange(mu, dtype=torch.int64, device=codes.device)
    base = torch.arange(inp // mu, dtype=torch.int64, device=codes.device) * 2**mu
    keys = [(((chunks >> i) & 1) * weights).sum(dim=2) + base for i in range(bits)]
    return torch.stack(keys)


def lut_matmul(x: torch.Tensor, w: BCQWeight, keys: torch.Tensor, mu: int) -> torch.Tensor:
    """``x @ W^T`` by look-ups: x (B, in), keys from :func:`lut_keys` -> (B, out) in x's dtype."""
    b, inp = x.shape
    out = w.shape[0]
    groups = inp // w.group_size
    table = lut_tables(x, mu).reshape(b, -1)  # (B, C * 2^mu)
    looked = table[:, keys]  # (B, q, out, C)
    per_group = looked.reshape(b, w.bits, out, groups, w.group_size // mu).sum(dim=4)  # (B, q, out, G)
    alpha = w.alpha.to(x.dtype).permute(2, 0, 1)  # (q, out, G)
    y = (per_group * alpha).sum(dim=(1, 3))
    xsum = x.reshape(b, groups, w.group_size).sum(dim=2)  # (B, G)
    return y + xsum @ w.offset.to(x.dtype).t()


class LutGemm:
    """A BCQ weight ready for look-up matmuls: ``lut(x)`` for x (..., in) -> (..., out)."""

    def __init__(self, w: BCQWeight, mu: int = DEFAULT_MU) -> None:
        check_mu(mu, w.group_size)
        self.weight, self.mu = w, mu
        self.keys = lut_keys(w.codes, w.bits, mu)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = lut_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.keys, self.mu)
        return y.reshape(*lead, -1)


def use_lutgemm(model: nn.Module, mu: int = DEFAULT_MU, on: bool = True) -> int:
    """Run every BCQ ``QuantLinear`` of ``model`` through LUT-GEMM (``on``) or back through its
    dequantized weight; returns how many layers were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bcq is not None:
            m.lut = LutGemm(m.bcq, mu) if on else None
            n += 1
    return n
