"""Every entry of the architecture table matches a real transformers model of that family."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit.archs import ARCHS, decoder_blocks, get_arch
from lowbit.errors import LowbitError
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}
CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None, "intermediate_size": None},
}


def _tiny(model_type: str) -> nn.Module:
    kwargs = {**SMALL, **CONFIGS[model_type]}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if model_type == "opt":
        kwargs["ffn_dim"] = 128
        kwargs["num_hidden_layers"] = 2
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_every_table_entry_is_tested() -> None:
    assert set(CONFIGS) | {"gemma3"} == set(ARCHS)  # gemma3 (multimodal wrapper) shares gemma3_text's block


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_table_paths_exist(model_type: str) -> None:
    model = _tiny(model_type)
    arch = get_arch(model)
    blocks = decoder_blocks(model, arch)
    assert len(blocks) == 2
    block = blocks[0]
    assert block.get_submodule(arch.attention) is not None
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    ordered = [name for group in arch.sequential for name in group]
    assert sorted(ordered) == sorted(linears), "the sub-layer order must name every linear of a block once"
    for source, targets in arch.smooth:
        src = block.get_submodule(source)
        for t in targets:
            tgt = block.get_submodule(t)
            assert isinstance(tgt, nn.Linear)
            # the source's output feeds the target: its width is the target's input width
            width = src.out_features if isinstance(src, nn.Linear) else src.weight.shape[0]
            assert width == tgt.in_features or (
                isinstance(src, nn.Linear) and tgt.in_features % width == 0  # v -> o with grouped KV heads
            )


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_pipeline_runs_on_each_family(model_type: str) -> None:
    model = _tiny(model_type)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    report = quantize_model(model, get_preset("w8a16"), ids, batch_size=2, progress=False)
    n_linear = sum(len(g) for g in get_arch(model).sequential) * 2
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear == len(report.layers)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert 0 < rel < 1e-2


def test_unknown_architecture_names_it() -> None:
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LowbitError, match=r"'gpt2'.*lowbit/archs.py"):
        get_arch(model)
