"""Modules that run a quantized model for evaluation: QuantLinear and activation quantizers.

``QuantLinear`` keeps the QuantizedWeight (codes, scales, zero points) and its dequantized
float weight, so the forward pass is one ``F.linear``; activation quantizers fake-quantize the
input (static per tensor with observed parameters, or dynamic per token, optionally with
LLM.int8()'s float outlier dimensions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.bcq import BCQWeight
from lowbit.clusters import channel_clusters, cluster_ranges
from lowbit.olive import olive_dynamic_fake_quantize, olive_grid
from lowbit.primitives import fake_quantize, per_token_fake_quantize, qparams
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantSpec


class ActQuantizer(nn.Module):
    """Fake quantization of an activation tensor (..., H) with ``spec``.

    Dynamic specs compute a range per token (or per tensor) at run time; static specs use the
    ``scale``/``zero_point`` buffers set by :meth:`set_range` from calibration.

    With ``spec.outlier_threshold`` (LLM.int8(), Dettmers et al. 2022) the input dimensions
    whose largest magnitude over all tokens of the current input exceeds the threshold pass
    through in float and are left out of the per-token scales; the rest is quantized per token.
    The two parts occupy disjoint columns (the quantized part is exactly 0 on outlier columns),
    so ``F.linear(y, W)`` is the int8 matmul of the regular columns plus the float matmul of the
    outlier columns, as bitsandbytes computes it. How many dimensions were kept in float, and
    which, is counted per call (:meth:`outlier_summary`, :meth:`outlier_positions`) in buffers
    that are not part of the state dict: statistics of a run, not parameters of the model.

    Granularity ``cluster`` (RPTQ): ``cluster_idx`` (H,) int64 gives each input channel's cluster;
    ``scale`` / ``zero_point`` are (k,), one per cluster. ``set_range`` takes per-channel (H,)
    ranges; the clusters are the ones given (a reorder step chose them) or, if none were, K-means
    on the channels' (min, max) with seed 0.
    """

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    cluster_idx: torch.Tensor | None
    outlier_hits: torch.Tensor | None  # (H,) int64: calls in which each input dimension was an outlier
    outlier_max_dims: torch.Tensor | None  # () int64: most outlier dimensions in one call

    def __init__(self, spec: QuantSpec, clusters: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("cluster_idx", None if clusters is None else clusters.to(torch.int64))
        self.register_buffer("outlier_hits", None, persistent=False)
        self.register_buffer("outlier_max_dims", None, persistent=False)
        self.outlier_calls = 0

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        s = self.spec
        if s.granularity == "cluster":
            assert s.clusters is not None  # QuantSpec checked it
            if self.cluster_idx is None:
                self.cluster_idx = channel_clusters(lo, hi, s.clusters).to(lo.device)
            lo, hi = cluster_ranges(lo, hi, self.cluster_idx, s.clusters)
        self.scale, self.zero_point = qparams(lo, hi, s.fmt, s.symmetric, s.scale_dtype)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale, self.zero_point = scale.to(torch.float32), zero_point.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.dynamic:
            if s.encoding == "olive":  # dynamic per tensor (the scheme checks it)
                y = olive_dynamic_fake_quantize(x, olive_grid(s.bits))
            elif s.outlier_threshold is not None:
                y = self._mixed_precision(x, s.outlier_threshold)
            elif s.granularity == "token":
                y = per_token_fake_quantize(x, s.fmt, s.symmetric, s.scale_dtype)
            else:
                flat = x.detach().to(torch.float32)
                scale, zp = qparams(flat.amin(), flat.amax(), s.fmt, s.symmetric, s.scale_dtype)
                y = fake_quantize(x, scale, zp, s.fmt)
        else:
            if self.scale is None or self.zero_point is None:
                raise RuntimeError("static activation quantizer used before calibration set its range")
            if self.cluster_idx is not None:  # per cluster: each channel takes its cluster's parameters
                y = fake_quantize(x, self.scale[self.cluster_idx], self.zero_point[self.cluster_idx], s.fmt)
            else:
                y = fake_quantize(x, self.scale, self.zero_point, s.fmt)
        return y.to(x.dtype)

    def _mixed_precision(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """LLM.int8()'s decomposition: outlier columns in float, the others quantized per token."""
        s = self.spec
        xf = x.to(torch.float32)
        if xf.numel() == 0:
            return xf
        outliers = xf.detach().abs().reshape(-1, xf.shape[-1]).amax(dim=0) > threshold  # (H,)
        # zeros neither widen a symmetric range nor an asymmetric one (which always contains 0),
        # and 0 quantizes to exactly 0: zeroing the outlier columns leaves them out of the scales
        regular = xf.masked_fill(outliers, 0.0)
        y = per_token_fake_quantize(regular, s.fmt, s.symmetric, s.scale_dtype)
        self._count_outliers(outliers)
        return y + xf.masked_fill(~outliers, 0.0)

    @torch.no_grad()
    def _count_outliers(self, outliers: torch.Tensor) -> None:
        # out of place and on the device (no sync): the buffers may have been made under inference_mode
        hits = outliers.to(torch.int64)
        n = hits.sum()
        if self.outlier_hits is None or self.outlier_max_dims is None or self.outlier_hits.shape != hits.shape:
            self.outlier_hits, self.outlier_max_dims, self.outlier_calls = hits, n, 1
            return
        self.outlier_hits = self.outlier_hits + hits
        self.outlier_max_dims = torch.maximum(self.outlier_max_dims, n)
        self.outlier_calls += 1

    def reset_outlier_stats(self) -> None:
        """Forget the outlier dimensions counted so far."""
        self.outlier_hits, self.outlier_max_dims, self.outlier_calls = None, None, 0

    def outlier_summary(self) -> dict[str, float]:
        """Outlier dimensions kept in float since the last reset (empty without a threshold).

        ``outlier_dims_mean`` / ``outlier_dims_max``: per forward call; ``outlier_dims_seen``:
        distinct dimensions ever flagged; ``outlier_calls``: forward calls counted.
        """
        if self.spec.outlier_threshold is None:
            return {}
        if self.outlier_hits is None or self.outlier_max_dims is None or self.outlier_calls == 0:
            return {"outlier_dims_mean": 0.0, "outlier_dims_max": 0.0, "outlier_dims_seen": 0.0, "outlier_calls": 0.0}
        return {
            "outlier_dims_mean": float(self.outlier_hits.sum()) / self.outlier_calls,
            "outlier_dims_max": float(self.outlier_max_dims),
            "outlier_dims_seen": float((self.outlier_hits > 0).sum()),
            "outlier_calls": float(self.outlier_calls),
        }

    def outlier_positions(self, limit: int | None = None) -> list[int]:
        """Input dimensions flagged as outliers, most often flagged first (ties: lower index first)."""
        if self.outlier_hits is None:
            return []
        hits = self.outlier_hits.cpu()
        flagged = torch.nonzero(hits > 0).flatten()
        # stable sort on descending counts keeps equal counts in index order
        order = torch.sort(hits[flagged], descending=True, stable=True).indices
        positions = flagged[order].tolist()
        return positions if limit is None else positions[:limit]

    def extra_repr(self) -> str:
        return self.spec.describe()


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight (and optionally quantized input activations)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    # BCQ binary codes (LUT-GEMM) are not a QuantizedWeight grid: such a layer has ``qweight``
    # None and its weight in ``bcq``; ``lut`` (lowbit.lutgemm.use_lutgemm) replaces F.linear
    bcq: BCQWeight | None = None
    lut: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self,
        qweight: QuantizedWeight | BCQWeight | None,
        bias: torch.Tensor | None,
        act: ActQuantizer | None = None,
        float_weight: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """``qweight`` None keeps ``float_weight`` unquantized (activation-only quantization)."""
        super().__init__()
        if qweight is not None:
            weight = qweight.dequantize().to(dtype)
        elif float_weight is not None:
            weight = float_weight.detach().clone()
        else:
            raise ValueError("QuantLinear needs a quantized or a float weight")
        self.out_features, self.in_features = weight.shape
        if isinstance(qweight, BCQWeight):
            self.bcq, qweight = qweight, None
        self.qweight = qweight
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act = act

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, qweight: QuantizedWeight | BCQWeight | None, act: ActQuantizer | None
    ) -> QuantLinear:
        return cls(qweight, linear.bias, act, float_weight=linear.weight, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        if self.lut is not None:
            y = self.lut(x).to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        act = f", act={self.act.spec.describe()}" if self.act is not None else ""
        w = self.qweight.spec.describe() if self.qweight is not None else "float"
        w = self.bcq.describe() if self.bcq is not None else w
        return f"in={self.in_features}, out={self.out_features}, w={w}{act}"
