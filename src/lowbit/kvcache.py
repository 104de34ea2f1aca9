"""KV-cache quantization: keys (after RoPE) and values fake-quantized where attention reads them.

transformers dispatches attention through a registry of named implementations; lowbit
registers ``lowbit_kv``, which quantizes ``key``/``value`` (B, n_kv_heads, T, head_dim) with the
``KVQuantizer`` attached to the attention module and then runs PyTorch SDPA. Granularities:
``token`` (dynamic: one range per token and head), ``head`` (static: one range per KV head,
observed on calibration data) and ``tensor`` (static: one range per layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from lowbit.primitives import fake_quantize, per_token_fake_quantize, qparams
from lowbit.qweight import spec_observer
from lowbit.scheme import QuantSpec

ATTN_IMPL = "lowbit_kv"


def _kv_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
):
    kvq = getattr(module, "lowbit_kv", None)
    if isinstance(kvq, KVQuantizer):
        key, value = kvq(key, value)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


AttentionInterface.register(ATTN_IMPL, _kv_attention)
AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


class KVQuantizer(nn.Module):
    """Quantizes keys and values (B, n_kv, T, D); static ranges are observed while ``observing``."""

    def __init__(self, spec: QuantSpec, n_kv_heads: int) -> None:
        super().__init__()
        self.spec = spec
        self.n_kv_heads = n_kv_heads
        self.observing = False
        self.enabled = True
        self.qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        n_obs = n_kv_heads if spec.granularity == "head" else 1
        self._observers = {kind: [spec_observer(spec) for _ in range(n_obs)] for kind in ("k", "v")}

    def _observe(self, kind: str, x: torch.Tensor) -> None:
        obs = self._observers[kind]
        if len(obs) == 1:
            obs[0].update(x.detach())
        else:
            for h, o in enumerate(obs):
                o.update(x[:, h].detach())

    def reduce(self) -> None:
        """Combine the static ranges observed on every torch.distributed rank (a collective:
        every rank calls it exactly once, after the last observed pass and before
        :meth:`finish_calibration`). A no-op for dynamic specs and in a single process."""
        if self.spec.dynamic:
            return
        for obs in self._observers.values():
            for o in obs:
                o.reduce()

    def finish_calibration(self) -> None:
        """Turn the observed ranges into scales and zero points (static granularities)."""
        s = self.spec
        for kind, obs in self._observers.items():
            ranges = [o.range() for o in obs]
            lo = torch.stack([r[0] for r in ranges]).reshape(1, -1, 1, 1)
            hi = torch.stack([r[1] for r in ranges]).reshape(1, -1, 1, 1)
            self.qparams[kind] = qparams(lo, hi, s.fmt, s.symmetric, s.scale_dtype)
        self.observing = False

    def _quantize(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if self.observing:
            self._observe(kind, x)
            return x
        if not self.enabled:
            return x
        if s.dynamic:
            return per_token_fake_quantize(x, s.fmt, s.symmetric, s.scale_dtype).to(x.dtype)
        if kind not in self.qparams:
            raise RuntimeError("static KV quantizer used before calibration set its range")
        scale, zp = self.qparams[kind]
        return fake_quantize(x, scale, zp, s.fmt).to(x.dtype)

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantize("k", key), self._quantize("v", value)

    def extra_repr(self) -> str:
        return self.spec.describe()


def attach_kv_quantizers(model: nn.Module, attentions: list[nn.Module], spec: QuantSpec) -> list[KVQuantizer]:
    """Give each attention module a KVQuantizer and switch the model to the ``lowbit_kv`` attention."""
    config: Any = model.config
    n_kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    quantizers = []
    for attn in attentions:
        q = KVQuantizer(spec, n_kv)
        q.observing = not spec.dynamic
        attn.lowbit_kv = q
        quantizers.append(q)
    config._attn_implementation = ATTN_IMPL
    return quantizers


@contextlib.contextmanager
def kv_paused(kvq: KVQuantizer | None) -> Iterator[None]:
    """Neither observe nor quantize the KV cache for the ``with`` body (e.g. while a transform
    collects statistics on the block before the float pass); the flags are restored after."""
    if kvq is None:
        yield
        return
    saved = (kvq.observing, kvq.enabled)
    kvq.observing, kvq.enabled = False, False
    try:
        yield
    finally:
        kvq.observing, kvq.enabled = saved
