"""GPTQ (Frantar et al., 2023) for one weight matrix, and the Hessian it needs.

For a linear layer ``y = W x`` GPTQ quantizes ``W`` one input column at a time and, after each
column, moves that column's rounding error onto the columns not yet quantized so that the
layer output on the calibration inputs changes as little as possible. The quantity minimised
is ``||W X - Ŵ X||²``, whose Hessian with respect to a row of ``W`` is ``H = 2 X Xᵀ / n``.

This module is pure tensor code (no model): :class:`HessianAccumulator` sums ``X Xᵀ`` over
streamed batches, :func:`gptq_quantize` turns ``(W, H, spec)`` into a ``QuantizedWeight``.
Rows of ``W`` are independent given ``H``, so layers that read the same input (q/k/v,
gate/up) can be quantized as one stacked matrix.

Implementation follows the paper: damping ``λ = damp · mean(diag H)``, the upper Cholesky
factor of ``H⁻¹`` (so each column's update is one row of it), lazy batch updates of
``block_size`` columns, optional act-order (descending ``diag H``). Group parameters are
computed when a group's first column is reached, from the group's current (already updated)
weights; with ``static_groups`` they are fixed from the original weights before any update,
so act-order needs no ``g_idx`` at inference. OWQ (Lee et al., 2024) is ``keep``: columns
left in float, placed last so they absorb the error of every quantized column.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lowbit import dist
from lowbit.errors import LowbitError
from lowbit.observers import row_range
from lowbit.primitives import SCALE_DTYPES, qparams, quantize
from lowbit.qweight import QuantizedWeight, spec_fake_quant
from lowbit.scheme import QuantSpec


class HessianAccumulator:
    """Running ``sum x xᵀ`` over the rows of streamed activations ``(..., in)``; no activations kept.

    Data-parallel calibration: each rank adds its share of the inputs, then :meth:`reduce` once.
    """

    def __init__(
        self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if self.count == 0 and self.sum.device != x.device:  # sum where the activations are
            self.sum = self.sum.to(x.device)
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, self.sum.dtype)
        if x.shape[1] != self.sum.shape[0]:
            raise LowbitError(f"activation width {x.shape[1]} does not match the Hessian's {self.sum.shape[0]}")
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def reduce(self) -> None:
        """Sum ``sum`` and ``count`` over the ranks of torch.distributed (a collective: every rank
        calls it), so the accumulator equals one fed every rank's inputs, up to the order of the
        floating-point sums. A no-op in a single process. Call it exactly once, after the last
        :meth:`add` and before :meth:`hessian` (a second call would multiply by the world size)."""
        if dist.world() == 1:
            return
        dist.all_reduce_sum_(self.sum)
        count = torch.tensor(self.count, dtype=torch.int64)
        self.count = int(dist.all_reduce_sum_(count))

    def hessian(self) -> torch.Tensor:
        """``H = 2 X Xᵀ / n`` in float32 (zeros when nothing was added)."""
        if self.count == 0:
            return torch.zeros_like(self.sum, dtype=torch.float32)
        return (self.sum * (2.0 / self.count)).to(torch.float32)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: torch.Tensor  # (out,) per row: sum over columns of (w - q)² / (2 [H⁻¹]_jj), what GPTQ minimises
    damp: float  # the damping fraction finally used (raised from the requested one if Cholesky failed)
    seconds: float


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops: on CPU, intra-op threads cost more than they
    give (3-30x slower on 2 cores, worse when the other core is busy), so use one, then restore."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_cholesky(h: torch.Tensor, damp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    When a factorisation fails (a rank-deficient or badly conditioned ``H``), ``damp`` is
    multiplied by 10 and tried again. Computed in float64; returns (factor in float32, damp used).
    """
    h64 = h.to(torch.float64)
    mean_diag = float(h64.diagonal().mean())
    if mean_diag <= 0 or not torch.isfinite(h64).all():
        raise LowbitError("the Hessian is zero or not finite: the layer saw no usable calibration input")
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    for _ in range(max_tries):
        lower, info = torch.linalg.cholesky_ex(h64 + damp * mean_diag * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper.to(torch.float32), damp
        damp *= 10
    raise LowbitError(f"Cholesky factorisation failed even with damping {damp / 10:g}; the Hessian is degenerate")


def _ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per row of ``w`` (rows = one group each) with the spec's observer (MSE clipping if 'mse')."""
    return row_range(w, spec.observer, fake_quant=spec_fake_quant(spec), **spec.observer_args)


def _group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, each (out, 1), for the columns ``w`` (out, n) forming one group."""
    lo, hi = _ranges(w, spec)
    scale, zp = qparams(lo, hi, spec.fmt, spec.symmetric, spec.scale_dtype)
    return scale[:, None], zp[:, None]


def _static_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of every group from the weights before any update: (out, G) each, G = 1 unless grouped."""
    out, inp = w.shape
    if spec.granularity == "tensor":
        lo, hi = _ranges(w.reshape(1, -1), spec)
        scale, zp = qparams(lo, hi, spec.fmt, spec.symmetric, spec.scale_dtype)
        return scale.expand(out)[:, None].clone(), zp.expand(out)[:, None].clone()
    if spec.granularity == "channel":
        return _group_params(w, spec)
    gs = spec.group_size
    assert gs is not None
    parts = [_group_params(w[:, s : s + gs], spec) for s in range(0, inp, gs)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    keep: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize ``w`` (out, in) with GPTQ given the layer Hessian ``h`` (in, in).

    ``keep``: indices of input columns to leave in float (OWQ's weak columns); they are
    updated by the error feedback and stored as ``outlier_weight`` in float16.
    """
    start = time.perf_counter()
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise LowbitError(f"GPTQ needs W (out, in) and H (in, in); got {tuple(w.shape)} and {tuple(h.shape)}")
    if spec.granularity not in ("tensor", "channel", "group"):
        raise LowbitError(f"GPTQ quantizes weights per tensor, channel or group, not per {spec.granularity}")
    if spec.encoding is not None:
        raise LowbitError(f"GPTQ solves on plain grids, not encoding {spec.encoding!r}: use the step {spec.encoding}")
    W = w.detach().to(torch.float32).clone()
    if not torch.isfinite(W).all():
        raise LowbitError("the weight contains NaN or inf; the model file is damaged or was trained unstably")
    out, inp = W.shape
    H = h.detach().to(torch.float32).clone()
    gs = spec.group_size if spec.granularity == "group" else None
    if gs is not None and gs > inp:
        raise LowbitError(f"group_size {gs} is larger than the input dimension {inp}; use a smaller group")

    dead = H.diagonal() == 0  # inputs that are always zero: any value works, GPTQ's convention is 0
    if bool(dead.all()):
        raise LowbitError("the Hessian is zero: the layer saw no calibration input (or only zeros)")
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    keep_mask = torch.zeros(inp, dtype=torch.bool, device=W.device)
    if keep is not None and keep.numel():
        keep = keep.to(W.device)
        if int(keep.min()) < 0 or int(keep.max()) >= inp:
            raise LowbitError(f"float columns {keep.tolist()} are outside 0..{inp - 1}")
        keep_mask[keep] = True
    n_q = inp - int(keep_mask.sum())
    if n_q == 0:
        raise LowbitError("OWQ asked to keep every column in float; nothing would be quantized")

    diag = H.diagonal()
    quantized_cols = torch.nonzero(~keep_mask).flatten()
    if act_order:
        quantized_cols = quantized_cols[torch.argsort(diag[quantized_cols], descending=True, stable=True)]
    perm = torch.cat([quantized_cols, torch.nonzero(keep_mask).flatten()])

    # parameters fixed before any update: per channel / tensor, or static groups
    fixed_scale = fixed_zp = None
    if gs is None or static_groups:
        base = W.clone()
        base[:, keep_mask] = 0.0  # float columns take no part in the ranges
        if gs is None:
            base = base[:, ~keep_mask]
        fixed_scale, fixed_zp = _static_params(base, spec)

    W = W[:, perm]
    hinv, damp_used = inverse_cholesky(H[perm][:, perm], damp)

    codes = torch.zeros(out, inp, dtype=torch.float32, device=W.device)  # grid values q, permuted order
    losses = torch.zeros(out, dtype=torch.float64, device=W.device)
    group_scales: list[torch.Tensor] = []
    group_zps: list[torch.Tensor] = []
    g_perm = torch.zeros(inp, dtype=torch.int64, device=W.device)  # group of each permuted column (dynamic groups)
    scale = zp = torch.empty(0, device=W.device)
    with _one_cpu_thread(W.device):
        for i1 in range(0, n_q, block_size):
            i2 = min(i1 + block_size, n_q)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if gs is None:
                    assert fixed_scale is not None and fixed_zp is not None
                    scale, zp = fixed_scale, fixed_zp
                elif static_groups:
                    assert fixed_scale is not None and fixed_zp is not None
                    g = int(perm[j]) // gs
                    scale, zp = fixed_scale[:, g : g + 1], fixed_zp[:, g : g + 1]
                elif j % gs == 0:
                    end = min(j + gs, n_q)
                    cols = W1[:, i : min(end - i1, i2 - i1)]
                    if end > i2:  # columns past this lazy block have not yet received its updates
                        ahead = W[:, i2:end] - Err1[:, :i] @ hinv[i1:j, i2:end]
                        cols = torch.cat([cols, ahead], 1)
                    scale, zp = _group_params(cols, spec)
                    group_scales.append(scale)
                    group_zps.append(zp)
                if gs is not None and not static_groups:
                    g_perm[j] = len(group_scales) - 1
                col = W1[:, i : i + 1]
                q = quantize(col, scale, zp, spec.fmt)
                dq = (q - zp) * scale
                d = Hinv1[i, i]
                codes[:, j : j + 1] = q
                err = (col - dq) / d
                losses += (err.squeeze(1).double() ** 2) / 2
                W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
                Err1[:, i : i + 1] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    if gs is None:
        assert fixed_scale is not None and fixed_zp is not None
        scale_all, zp_all, g_idx = fixed_scale, fixed_zp, torch.zeros(inp, dtype=torch.int64, device=W.device)
    elif static_groups:
        assert fixed_scale is not None and fixed_zp is not None
        scale_all, zp_all = fixed_scale, fixed_zp
        g_idx = torch.arange(inp, dtype=torch.int64, device=W.device) // gs
    else:
        # float columns can leave fewer groups than ceil(in / gs); pad so every file layout fits
        n_groups = -(-inp // gs)
        group_scales += group_scales[-1:] * (n_groups - len(group_scales))
        group_zps += group_zps[-1:] * (n_groups - len(group_zps))
        scale_all, zp_all = torch.cat(group_scales, 1), torch.cat(group_zps, 1)
        g_idx = g_perm[inv]
        g_idx[keep_mask] = 0  # float columns: any group; their codes are unused
    if spec.granularity == "tensor":
        scale_all, zp_all = scale_all[:1], zp_all[:1]
    kept = torch.nonzero(keep_mask).flatten()
    qw = QuantizedWeight(
        codes=spec.fmt.to_codes(codes),
        scale=scale_all.to(SCALE_DTYPES[spec.scale_dtype]),
        zero_point=zp_all,
        g_idx=g_idx,
        spec=spec,
        outlier_idx=kept if kept.numel() else None,
        outlier_weight=W[:, n_q:].to(torch.float16) if kept.numel() else None,
    )
    return GPTQResult(qw, losses.float(), damp_used, time.perf_counter() - start)
