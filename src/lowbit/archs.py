"""Architecture knowledge as data.

For each supported ``config.model_type``: where the decoder blocks are, the attention module
inside a block, the order of sub-layers (groups of linears that read the same input, in the
order a block computes them), and the smoothing pairs (which norm, or which earlier linear,
feeds which linears, so a per-channel scale can be folded exactly). Supporting a new family is
one entry in ``ARCHS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Arch:
    blocks: str
    attention: str
    sequential: tuple[tuple[str, ...], ...]
    smooth: tuple[tuple[str, tuple[str, ...]], ...]
    norm: str = "rms"  # rms | rms_plus_one (Gemma: x * (1 + w)) | layernorm (with bias)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_O = ("self_attn.o_proj",)
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_DOWN = ("mlp.down_proj",)
_LLAMA_ORDER = (_QKV, _O, _GATE_UP, _DOWN)


def _llama_like(blocks: str = "model.layers", mlp_norm: str = "post_attention_layernorm", norm: str = "rms") -> Arch:
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
    )


ARCHS: dict[str, Arch] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(norm="rms_plus_one"),
    # Gemma 2/3 normalise the MLP input with pre_feedforward_layernorm; post_* norms act on outputs
    "gemma2": _llama_like(mlp_norm="pre_feedforward_layernorm", norm="rms_plus_one"),
    "gemma3_text": _llama_like(mlp_norm="pre_feedforward_layernorm", norm="rms_plus_one"),
    "gemma3": _llama_like("model.language_model.layers", "pre_feedforward_layernorm", "rms_plus_one"),
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
    ),
}


def get_arch(model: nn.Module) -> Arch:
    """The table entry for ``model`` (a transformers model); unknown families are a clear error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise LowbitError(
            f"architecture {model_type!r} ({type(model).__name__}) is not in lowbit's table. "
            f"Supported: {', '.join(sorted(ARCHS))}. To add it, write one entry in lowbit/archs.py "
            "ARCHS: the path of the decoder blocks, the attention module, the sub-layer order and the "
            "norm->linear pairs."
        )
    return ARCHS[model_type]


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
