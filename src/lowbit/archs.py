"""Architecture knowledge as data: one table for the runner, the smoothing pairs and every exporter.

For each supported ``config.model_type``, one :class:`Arch` entry in ``ARCHS`` says:

- for the runner: where the decoder blocks are, the attention module inside a block, the order of
  sub-layers (groups of linears that read the same input, in the order a block computes them);
- for smoothing: the pairs (which norm, or which earlier linear, feeds which linears, so a
  per-channel scale can be folded exactly) and the kind of norm;
- for the GGUF exporter (``gguf``, a :class:`GGUFArch`): llama.cpp's architecture name, the HF ->
  GGUF tensor names, the metadata keys and the quirks (see :class:`GGUFArch`);
- for the ONNX exporter (``onnx``, an :class:`OnnxLayout`): the modules the graph builder reads.

An exporter part is ``None`` where that exporter does not support the family; the exporter's
refusal names the family. Supporting a new family is one entry here; the exporters hold only code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.errors import LowbitError

# ---- GGUF (llama.cpp) -------------------------------------------------------------------------------

# HF name (under the model) -> GGUF name
_GGUF_MODEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# HF name (under decoder block i) -> GGUF name (under ``blk.{i}``)
_GGUF_BLOCK = {
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
_GGUF_QKV_BIAS = {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
# GGUF metadata key (under the arch) -> config attribute; all unsigned 32-bit integers
_GGUF_INT_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
}
_GGUF_FLOAT_KEYS = {"attention.layer_norm_rms_epsilon": "rms_norm_eps"}


@dataclass(frozen=True)
class GGUFArch:
    """What a GGUF file of one family holds, and how HF's names and config map onto it.

    - ``permute``: GGUF tensors whose rows llama.cpp's arch stores reordered within each head (and
      the config attribute with that tensor's head count): the ``llama`` arch keeps ``attn_q``/``attn_k``
      rows as interleaved pairs rather than HF's two halves, as convert_hf_to_gguf's ``permute`` does;
      transformers' GGUF loader reverses it. The permutation moves whole rows, so codes survive it.
    - ``head_dim_key``: whether readers take the head size from ``rope.dimension_count``; archs
      without it (qwen2) must have ``head_dim == hidden_size / num_attention_heads``.
    - ``config_must``: config attributes that must hold a value, or the file would describe another
      model (e.g. a llama with attention biases: llama.cpp's llama has none).
    """

    arch: str  # llama.cpp's general.architecture
    blocks: str  # HF prefix of decoder block i (the entry's ``blocks``)
    model_names: dict[str, str]
    block_names: dict[str, str]
    permute: dict[str, str]
    head_dim_key: bool
    config_must: dict[str, Any] = field(default_factory=dict)
    int_keys: dict[str, str] = field(default_factory=lambda: dict(_GGUF_INT_KEYS))
    float_keys: dict[str, str] = field(default_factory=lambda: dict(_GGUF_FLOAT_KEYS))

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


# ---- ONNX --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxLayout:
    """The modules the ONNX graph builder reads, by role: paths relative to the model, or to a decoder
    block (the blocks themselves are the entry's ``blocks``). The graph is RMSNorm, RoPE, grouped-query
    attention and a SwiGLU MLP (``gate``, ``up``, ``down``)."""

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    post_norm: str = "post_attention_layernorm"
    attn: tuple[str, str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp: tuple[str, str, str] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    qk_norm: tuple[str, str] | None = None  # per-head RMSNorm of queries and keys (Qwen3)


# ---- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Arch:
    """One family: its runner and smoothing facts, and each exporter's part (``None``: refused).

    ``blocks`` is the ModuleList of decoder blocks, ``attention`` the attention module in a block,
    ``sequential`` the groups of linears that read one input (in computation order), ``smooth`` the
    (source norm or linear, consumer linears) pairs a per-channel scale folds through exactly.
    """

    blocks: str
    attention: str
    sequential: tuple[tuple[str, ...], ...]
    smooth: tuple[tuple[str, tuple[str, ...]], ...]
    norm: str = "rms"  # rms | rms_plus_one (Gemma: x * (1 + w)) | layernorm (with bias)
    gguf: GGUFArch | None  # None: the GGUF exporter refuses the family
    onnx: OnnxLayout | None  # None: the ONNX exporter refuses the family


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_O = ("self_attn.o_proj",)
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_DOWN = ("mlp.down_proj",)
_LLAMA_ORDER = (_QKV, _O, _GATE_UP, _DOWN)
_LLAMA_ONNX = OnnxLayout()


def _llama_like(
    blocks: str = "model.layers",
    mlp_norm: str = "post_attention_layernorm",
    norm: str = "rms",
    *,
    gguf: GGUFArch | None,
    onnx: OnnxLayout | None,
) -> Arch:
    return Arch(
        blocks=blocks,
        attention="self_attn",
        sequential=_LLAMA_ORDER,
        smooth=(
            ("input_layernorm", _QKV),
            ("self_attn.v_proj", _O),
            (mlp_norm, _GATE_UP),
            ("mlp.up_proj", _DOWN),
        ),
        norm=norm,
        gguf=gguf,
        onnx=onnx,
    )


ARCHS: dict[str, Arch] = {
    "llama": _llama_like(
        gguf=GGUFArch(
            arch="llama",
            blocks="model.layers",
            model_names=_GGUF_MODEL,
            block_names=_GGUF_BLOCK,
            permute={"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"},
            head_dim_key=True,
            config_must={"attention_bias": False, "mlp_bias": False},
        ),
        onnx=_LLAMA_ONNX,
    ),
    "mistral": _llama_like(gguf=None, onnx=_LLAMA_ONNX),
    "qwen2": _llama_like(
        gguf=GGUFArch(
            arch="qwen2",
            blocks="model.layers",
            model_names=_GGUF_MODEL,
            block_names={**_GGUF_BLOCK, **_GGUF_QKV_BIAS},
            permute={},
            head_dim_key=False,
            config_must={"use_sliding_window": False},
        ),
        onnx=_LLAMA_ONNX,  # q/k/v biases are the modules' own
    ),
    "qwen3": _llama_like(gguf=None, onnx=OnnxLayout(qk_norm=("self_attn.q_norm", "self_attn.k_norm"))),
    "gemma": _llama_like(norm="rms_plus_one", gguf=None, onnx=None),
    # Gemma 2/3 normalise the MLP input with pre_feedforward_layernorm; post_* norms act on outputs
    "gemma2": _llama_like(mlp_norm="pre_feedforward_layernorm", norm="rms_plus_one", gguf=None, onnx=None),
    "gemma3_text": _llama_like(mlp_norm="pre_feedforward_layernorm", norm="rms_plus_one", gguf=None, onnx=None),
    "gemma3": _llama_like(
        "model.language_model.layers", "pre_feedforward_layernorm", "rms_plus_one", gguf=None, onnx=None
    ),
    "phi3": Arch(
        blocks="model.layers",
        attention="self_attn",
        sequential=(
            ("self_attn.qkv_proj",),
            ("self_attn.o_proj",),
            ("mlp.gate_up_proj",),
            ("mlp.down_proj",),
        ),
        # qkv and gate_up are fused, so v->o and up->down cannot be smoothed exactly
        smooth=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
        gguf=None,
        onnx=None,
    ),
    "opt": Arch(
        blocks="model.decoder.layers",
        attention="self_attn",
        sequential=(_QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        smooth=(
            ("self_attn_layer_norm", _QKV),
            ("self_attn.v_proj", ("self_attn.out_proj",)),
            ("final_layer_norm", ("fc1",)),
        ),
        norm="layernorm",
        gguf=None,
        onnx=None,
    ),
}


def model_type_of(model: nn.Module) -> Any:
    """``model.config.model_type`` (None without one): the key of ``ARCHS``."""
    return getattr(getattr(model, "config", None), "model_type", None)


def families_with(part: str) -> list[str]:
    """The families whose entry has ``part`` (``"gguf"``, ``"onnx"``), in table order."""
    return [name for name, arch in ARCHS.items() if getattr(arch, part) is not None]


def get_arch(model: nn.Module) -> Arch:
    """The table entry for ``model`` (a transformers model); unknown families are a clear error."""
    kind = model_type_of(model)
    if kind not in ARCHS:
        raise LowbitError(
            f"architecture {kind!r} ({type(model).__name__}) is not in lowbit's table. "
            f"Supported: {', '.join(sorted(ARCHS))}. To add it, write one entry in lowbit/archs.py "
            "ARCHS: the path of the decoder blocks, the attention module, the sub-layer order, the "
            "norm->linear pairs and the norm kind, plus its GGUF names and ONNX layout (or None where an "
            "exporter does not support it)."
        )
    return ARCHS[kind]


def decoder_blocks(model: nn.Module, arch: Arch) -> nn.ModuleList:
    """The ModuleList of decoder blocks."""
    try:
        blocks = model.get_submodule(arch.blocks)
    except AttributeError:
        raise LowbitError(
            f"{type(model).__name__} has no module {arch.blocks!r}, where lowbit's table expects the decoder blocks"
        ) from None
    if not isinstance(blocks, nn.ModuleList):
        raise LowbitError(f"{arch.blocks} of {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList")
    return blocks
