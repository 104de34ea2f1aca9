"""Every entry of the architecture table matches a real transformers model of that family, is complete
(the runner's part and each exporter's, or None), and is all the exporters know of a family."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import SHAPE, byte_tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowbit.archs import ARCHS, Arch, GGUFArch, OnnxLayout, decoder_blocks, families_with, get_arch
from lowbit.errors import LowbitError
from lowbit.export import export_model, get_exporter
from lowbit.export.base import refusal
from lowbit.export.gguf_names import GGUF_ARCHS
from lowbit.export.onnx_graph import build_decoder
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


# ---- one table for the runner, the smoothing pairs and every exporter ---------------------------------

RUNNER_FIELDS = {"blocks", "attention", "sequential", "smooth", "norm"}
EXPORTER_FIELDS = {"gguf": GGUFArch, "onnx": OnnxLayout}  # None: that exporter refuses the family
NORMS = ("rms", "rms_plus_one", "layernorm")


def test_the_entry_has_a_part_for_the_runner_and_each_exporter() -> None:
    fields = {f.name: f for f in dataclasses.fields(Arch)}
    assert set(fields) == RUNNER_FIELDS | set(EXPORTER_FIELDS)
    for name in EXPORTER_FIELDS:  # no default: every entry says what each exporter gets, None included
        assert fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING
        assert fields[name].kw_only


def _strings(value: object) -> bool:
    return isinstance(value, tuple) and len(value) > 0 and all(isinstance(s, str) and s for s in value)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_entry_is_complete(model_type: str) -> None:
    arch = ARCHS[model_type]
    # the runner and smoothing
    assert isinstance(arch.blocks, str) and arch.blocks and isinstance(arch.attention, str) and arch.attention
    assert isinstance(arch.sequential, tuple) and arch.sequential and all(_strings(g) for g in arch.sequential)
    linears = [name for group in arch.sequential for name in group]
    assert len(linears) == len(set(linears))
    assert isinstance(arch.smooth, tuple) and arch.smooth
    for source, targets in arch.smooth:
        assert isinstance(source, str) and source and _strings(targets) and set(targets) <= set(linears)
    assert arch.norm in NORMS
    # each exporter's part: a complete one, or None
    for name, kind in EXPORTER_FIELDS.items():
        part = getattr(arch, name)
        assert part is None or isinstance(part, kind), (name, part)
    if arch.gguf is not None:
        g = arch.gguf
        assert isinstance(g.arch, str) and g.arch and g.blocks == arch.blocks
        assert g.model_names and g.block_names and g.int_keys and g.float_keys and isinstance(g.head_dim_key, bool)
        assert {f"{layer}.weight" for layer in linears} <= set(g.block_names), "every linear has a GGUF name"
        assert set(g.permute) <= set(g.block_names.values())
        for attrs in (g.permute, g.int_keys, g.float_keys, g.config_must):
            assert all(isinstance(k, str) and k for k in attrs)
    if arch.onnx is not None:
        o = arch.onnx
        for role in ("embed", "final_norm", "lm_head", "rotary", "input_norm", "post_norm"):
            assert isinstance(getattr(o, role), str) and getattr(o, role), role
        assert len(o.attn) == 4 and len(o.mlp) == 3 and sorted((*o.attn, *o.mlp)) == sorted(linears)
        assert o.qk_norm is None or (_strings(o.qk_norm) and len(o.qk_norm) == 2)
        assert {o.input_norm, o.post_norm} <= {source for source, _ in arch.smooth}


def test_exporters_support_what_the_table_says() -> None:
    assert list(GGUF_ARCHS) == families_with("gguf") == ["llama", "qwen2"]
    assert families_with("onnx") == ["llama", "mistral", "qwen2", "qwen3"]
    assert all(GGUF_ARCHS[t] is ARCHS[t].gguf for t in GGUF_ARCHS)


class _Stub(nn.Module):
    """Only a config: what the exporters' architecture check reads first."""

    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)


UNSUPPORTED = [(t, fmt) for t in sorted(ARCHS) for fmt in sorted(EXPORTER_FIELDS) if getattr(ARCHS[t], fmt) is None]


@pytest.mark.parametrize(("model_type", "fmt"), UNSUPPORTED)
def test_a_family_without_an_exporter_part_is_refused_by_name(model_type: str, fmt: str) -> None:
    problems = get_exporter(fmt).check(_Stub(model_type), {})
    assert [p.prop for p in problems] == ["architecture"] and problems[0].detail.startswith(f"{model_type!r};")
    assert f"architecture: '{model_type}'" in str(refusal(fmt, problems))


def test_real_models_of_unsupported_families_are_refused_by_name(tmp_path: Path) -> None:
    for model_type, fmt in (("gemma", "gguf"), ("phi3", "onnx"), ("opt", "gguf"), ("opt", "onnx")):
        with pytest.raises(LowbitError, match=f"architecture: '{model_type}'"):
            export_model(_tiny(model_type), None, fmt, tmp_path / f"{model_type}-{fmt}")
    assert list(tmp_path.iterdir()) == []


def _seeded_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": 264})).float().eval()


def test_a_new_family_is_one_table_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A family copied from llama under a new model_type: the runner and both exporters take it from
    the table entry alone, and write what they write for llama."""
    llama, clone = _seeded_llama(), _seeded_llama()
    clone.config.model_type = "llama_clone"
    with pytest.raises(LowbitError, match="'llama_clone'"):
        get_arch(clone)
    assert "llama_clone" not in GGUF_ARCHS
    assert [p.prop for p in get_exporter("gguf").check(clone, {})] == ["architecture"]
    assert [p.prop for p in get_exporter("onnx").check(clone, {})] == ["architecture"]

    monkeypatch.setitem(ARCHS, "llama_clone", dataclasses.replace(ARCHS["llama"]))
    assert get_arch(clone) == ARCHS["llama"] and len(decoder_blocks(clone, get_arch(clone))) == 2
    assert "llama_clone" in GGUF_ARCHS and "llama_clone" in families_with("onnx")
    for key in clone.state_dict():
        name = GGUF_ARCHS["llama_clone"].gguf_name(key)
        assert name is not None and name == GGUF_ARCHS["llama"].gguf_name(key), key
    files = {}
    for kind, model in (("llama", llama), ("clone", clone)):
        res = export_model(model, byte_tokenizer(), "gguf", tmp_path / kind)
        files[kind] = (tmp_path / kind / res.files[0]).read_bytes()
    assert files["clone"] == files["llama"]
    assert get_exporter("onnx").check(clone, {}) == []
    graphs = [build_decoder(m)[0].graph.SerializeToString() for m in (llama, clone)]
    assert graphs[0] == graphs[1]
