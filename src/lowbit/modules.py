"""Modules that run a quantized model for evaluation: QuantLinear and activation quantizers.

``QuantLinear`` keeps the QuantizedWeight (codes, scales, zero points) and its dequantized
float weight, so the forward pass is one ``F.linear``; activation quantizers fake-quantize the
input (static per tensor with observed parameters, or dynamic per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.primitives import fake_quantize, per_token_fake_quantize, qparams
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantSpec


class ActQuantizer(nn.Module):
    """Fake quantization of an activation tensor (..., H) with ``spec``.

    Dynamic specs compute a range per token (or per tensor) at run time; static specs use the
    ``scale``/``zero_point`` buffers set by :meth:`set_range` from calibration.
    """

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        s = self.spec
        self.scale, self.zero_point = qparams(lo, hi, s.fmt, s.symmetric, s.scale_dtype)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale, self.zero_point = scale.to(torch.float32), zero_point.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.dynamic:
            if s.granularity == "token":
                y = per_token_fake_quantize(x, s.fmt, s.symmetric, s.scale_dtype)
            else:
                flat = x.detach().to(torch.float32)
                scale, zp = qparams(flat.amin(), flat.amax(), s.fmt, s.symmetric, s.scale_dtype)
                y = fake_quantize(x, scale, zp, s.fmt)
        else:
            if self.scale is None or self.zero_point is None:
                raise RuntimeError("static activation quantizer used before calibration set its range")
            y = fake_quantize(x, self.scale, self.zero_point, s.fmt)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return self.spec.describe()


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight (and optionally quantized input activations)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        qweight: QuantizedWeight | None,
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
        self.qweight = qweight
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act = act

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedWeight | None, act: ActQuantizer | None) -> QuantLinear:
        return cls(qweight, linear.bias, act, float_weight=linear.weight, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        act = f", act={self.act.spec.describe()}" if self.act is not None else ""
        w = self.qweight.spec.describe() if self.qweight is not None else "float"
        return f"in={self.in_features}, out={self.out_features}, w={w}{act}"
