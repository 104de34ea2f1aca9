"""Tiny random causal LMs built from configs (no downloads), for pipeline and checkpoint tests.

All share one shape: hidden 128, intermediate 256, 2 layers, 4 heads, 2 KV heads, head_dim 32,
vocab 256. Weights are seeded, so two calls with the same arguments give identical models.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}
VOCAB = SHAPE["vocab_size"]
N_LAYERS = SHAPE["num_hidden_layers"]
ARCH_NAMES = ("llama", "qwen2", "gemma3")


def _finish(model: nn.Module) -> nn.Module:
    return model.to(torch.float32).eval()


def tiny_llama(seed: int = 0, tie: bool = False, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPE, tie_word_embeddings=tie, attn_implementation=attn)
    return _finish(LlamaForCausalLM(config))


def tiny_qwen2(seed: int = 0, tie: bool = False, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(seed)
    config = Qwen2Config(**SHAPE, tie_word_embeddings=tie, attn_implementation=attn)
    return _finish(Qwen2ForCausalLM(config))


def tiny_gemma3(seed: int = 0, tie: bool = True, attn: str = "sdpa") -> nn.Module:
    """Gemma3 text model with one sliding-window (window 8, shorter than test sequences) and one
    full-attention layer, so both mask kinds are exercised."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        **SHAPE,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return _finish(Gemma3ForCausalLM(config))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """An architecture lowbit's table does not know."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=64)
    return _finish(GPT2LMHeadModel(config))


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def build(arch: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    return BUILDERS[arch](seed, **kwargs)


def token_ids(n: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    """(n, seq_len) random token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


def byte_tokenizer(eos: str = "</s>") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: one token per byte (ids 0..255), plus ``eos`` (id 256)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[eos] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)
