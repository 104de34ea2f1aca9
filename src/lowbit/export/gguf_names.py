"""Architecture knowledge for GGUF files, as data: tensor names, metadata keys, per-arch quirks.

For each supported Hugging Face ``model_type``: llama.cpp's architecture name, the HF -> GGUF
tensor names (model-level and per decoder block, ``{i}`` the block index), the metadata keys
and the config attributes they come from, and the quirks:

- ``permute``: GGUF tensors whose rows llama.cpp's arch stores reordered within each head (and
  the config attribute with that tensor's head count): the ``llama`` arch keeps ``attn_q``/``attn_k``
  rows as interleaved pairs rather than HF's two halves, as convert_hf_to_gguf's ``permute`` does;
  transformers' GGUF loader reverses it. The permutation moves whole rows, so codes survive it.
- ``head_dim_key``: whether readers take the head size from ``rope.dimension_count``; archs
  without it (qwen2) must have ``head_dim == hidden_size / num_attention_heads``.
- ``config_must``: config attributes that must hold a value, or the file would describe another
  model (e.g. a llama with attention biases: llama.cpp's llama has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# HF name (under the model) -> GGUF name
_MODEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_QKV_BIAS = {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}

# GGUF metadata key (under the arch) -> config attribute; all unsigned 32-bit integers
_INT_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
}
_FLOAT_KEYS = {"attention.layer_norm_rms_epsilon": "rms_norm_eps"}


@dataclass(frozen=True)
class GGUFArch:
    arch: str  # llama.cpp's general.architecture
    blocks: str  # HF prefix of decoder block i
    model_names: dict[str, str]
    block_names: dict[str, str]
    permute: dict[str, str]
    head_dim_key: bool
    config_must: dict[str, Any] = field(default_factory=dict)
    int_keys: dict[str, str] = field(default_factory=lambda: dict(_INT_KEYS))
    float_keys: dict[str, str] = field(default_factory=lambda: dict(_FLOAT_KEYS))

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name of an HF state-dict key, or None if the arch has none."""
        if hf_name in self.model_names:
            return self.model_names[hf_name]
        prefix = self.blocks + "."
        if hf_name.startswith(prefix):
            index, _, rest = hf_name[len(prefix) :].partition(".")
            if index.isdigit() and rest in self.block_names:
                return f"blk.{index}.{self.block_names[rest]}"
        return None

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF state-dict key of a GGUF tensor name (the inverse of ``gguf_name``), or None."""
        for hf, gg in self.model_names.items():
            if gg == gguf_name:
                return hf
        head, _, rest = gguf_name.partition(".")
        index, _, local = rest.partition(".")
        if head == "blk" and index.isdigit():
            for hf, gg in self.block_names.items():
                if gg == local:
                    return f"{self.blocks}.{index}.{hf}"
        return None

    def permute_heads(self, gguf_name: str) -> str | None:
        """The config attribute holding the head count of a GGUF tensor whose rows llama.cpp permutes
        (``permute``), or None when the tensor is stored in HF's row order."""
        head, _, rest = gguf_name.partition(".")
        index, _, local = rest.partition(".")
        if head == "blk" and index.isdigit():
            return self.permute.get(local)
        return None


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch(
        arch="llama",
        blocks="model.layers",
        model_names=_MODEL,
        block_names=_BLOCK,
        permute={"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"},
        head_dim_key=True,
        config_must={"attention_bias": False, "mlp_bias": False},
    ),
    "qwen2": GGUFArch(
        arch="qwen2",
        blocks="model.layers",
        model_names=_MODEL,
        block_names={**_BLOCK, **_QKV_BIAS},
        permute={},
        head_dim_key=False,
        config_must={"use_sliding_window": False},
    ),
}


def head_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order of convert_hf_to_gguf's ``permute``: within each head, HF's rows ``i`` (first half)
    and ``half + i`` (second half) become rows ``2i`` and ``2i + 1``."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def hf_row_order(rows: int, n_head: int) -> np.ndarray:
    """The inverse of ``head_row_order``: ``gguf_rows[hf_row_order(...)]`` gives HF's row order back."""
    return np.argsort(head_row_order(rows, n_head))


def arch_for_gguf(gguf_arch: str) -> GGUFArch | None:
    """The table entry whose llama.cpp ``general.architecture`` is ``gguf_arch``, or None."""
    for entry in GGUF_ARCHS.values():
        if entry.arch == gguf_arch:
            return entry
    return None
