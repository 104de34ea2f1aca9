"""Low-rank compensation (LoRC, Yao et al., "ZeroQuant-V2", 2023), used by ZeroQuant-FP.

The quantization error of a weight ``E = W - W^`` (out, in) is approximated by its rank-``r``
truncated SVD, ``E ~ U_r S_r V_r^T``, stored as two fp16 factors ``U = U_r S_r^(1/2)`` (out, r)
and ``V = S_r^(1/2) V_r^T`` (r, in), so the layer computes ``W^ x + U (V x)`` and
``W ~ W^ + U V``. The factors cost ``16 r (out + in)`` bits per matrix.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def lorc_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, r), V (r, in)) float16 from the error ``error`` (out, in) of a quantized weight.

    ``U = U_r diag(sqrt(S_r))``, ``V = diag(sqrt(S_r)) V_r^T`` from the SVD in float64 (exact
    enough that the factors are the same on every machine up to the fp16 rounding). ``rank`` is
    clipped to ``min(out, in)``.
    """
    if error.dim() != 2:
        raise LowbitError(f"LoRC factors a 2-D weight error (out, in), got shape {tuple(error.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LowbitError(f"LoRC rank must be a positive integer (e.g. 8), got {rank!r}")
    r = min(rank, *error.shape)
    u, s, vh = torch.linalg.svd(error.detach().to(torch.float64), full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(torch.float16), (root[:, None] * vh[:r]).to(torch.float16)


def lorc_bits(out_features: int, in_features: int, rank: int) -> float:
    """Extra bits per weight of rank-``rank`` fp16 factors on an (out, in) matrix."""
    return 16.0 * rank * (out_features + in_features) / (out_features * in_features)
