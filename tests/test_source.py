"""Block sources: a sharded directory read one block at a time gives the original model exactly; errors
before any work for files of another model or a damaged header; the streaming GGUF conversion gives
exactly what transformers' GGUF loader gives."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from test_export_gguf import bpe_tokenizer, export, g, quantized
from tiny_models import VOCAB, build, tiny_gemma3, tiny_llama, token_ids
from torch import nn
from transformers import AutoModelForCausalLM

import lowbit.models
from lowbit.archs import get_arch
from lowbit.cache import fetch_demo_model
from lowbit.errors import LowbitError
from lowbit.models import _convert_gguf, load_model
from lowbit.source import InMemorySource, ShardSource, open_source


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("LOWBIT_CACHE", str(path))
    return path


def save_sharded(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def load_all(source: ShardSource) -> None:
    source.load_outer()
    for i in range(source.model.config.num_hidden_layers):
        source.load(f"{source.blocks}.{i}")


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == torch.float32 and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_block_by_block_gives_the_original_model(arch: str, tmp_path: Path) -> None:
    original = build(arch)
    source = ShardSource(save_sharded(original, tmp_path / "m"))
    assert not source.in_memory and source.blocks == get_arch(original).blocks
    assert all(p.is_meta for p in source.model.parameters())
    assert not any(b.is_meta for b in source.model.buffers())  # rotary frequencies are computed
    load_all(source)
    assert not any(p.is_meta for p in source.model.parameters())
    assert_same_state(source.model, original)
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(source.model(ids).logits, original(ids).logits)


def test_outer_then_one_block_at_a_time(tmp_path: Path) -> None:
    original = tiny_llama()
    source = ShardSource(save_sharded(original, tmp_path / "m"))
    source.load_outer()
    model = source.model
    assert not model.model.embed_tokens.weight.is_meta and not model.lm_head.weight.is_meta
    assert not model.model.norm.weight.is_meta
    assert all(p.is_meta for p in model.model.layers.parameters())
    source.load("model.layers.1")
    assert all(p.is_meta for p in model.model.layers[0].parameters())
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, original.model.layers[1].mlp.up_proj.weight)
    source.release("model.layers.1")
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert not model.model.embed_tokens.weight.is_meta  # release of a block leaves the rest


def test_float_state_reads_the_files_again(tmp_path: Path) -> None:
    original = tiny_llama()
    source = ShardSource(save_sharded(original, tmp_path / "m"))
    source.load("model.layers.0")
    block = source.model.model.layers[0]
    with torch.no_grad():
        block.self_attn.q_proj.weight.mul_(2)
    state = source.float_state("model.layers.0")
    assert state.keys() == original.model.layers[0].state_dict().keys()
    for name, t in original.model.layers[0].state_dict().items():
        assert torch.equal(state[name], t), name
    assert not torch.equal(block.self_attn.q_proj.weight, state["self_attn.q_proj.weight"])
    block.load_state_dict(state)  # what a step does to put its weights back
    assert torch.equal(block.self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)


def test_in_memory_source() -> None:
    model = tiny_llama()
    source = InMemorySource(model)
    assert source.in_memory and source.model is model
    source.load_outer()
    source.load("model.layers.0")
    source.release("model.layers.0")
    assert not any(p.is_meta for p in model.parameters())
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    state = source.float_state("model.layers.0")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    assert torch.equal(state["mlp.down_proj.weight"], before)


def test_tied_embeddings(tmp_path: Path) -> None:
    original = tiny_gemma3()  # tied
    directory = save_sharded(original, tmp_path / "m")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    source = ShardSource(directory)
    source.load_outer()
    model = source.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert source.float_state("lm_head")["weight"].shape == (VOCAB, 128)
    source.release("")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_meta


def test_untied_head_is_read(tmp_path: Path) -> None:
    original = tiny_llama(tie=False)
    source = ShardSource(save_sharded(original, tmp_path / "m"))
    source.load_outer()
    assert source.model.lm_head.weight is not source.model.model.embed_tokens.weight
    assert torch.equal(source.model.lm_head.weight, original.lm_head.weight)


# ---- errors before any work --------------------------------------------------------------------------


def _rewrite_index(directory: Path, edit: dict[str, str | None]) -> None:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    for name, file in edit.items():
        if file is None:
            del index["weight_map"][name]
        else:
            index["weight_map"][name] = file
    path.write_text(json.dumps(index))


def test_missing_tensor(tmp_path: Path) -> None:
    directory = tmp_path / "m"
    tiny_llama().save_pretrained(directory)  # one file
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=r"lack 1 tensors .*model\.layers\.1\.mlp\.up_proj\.weight.*another model"):
        ShardSource(directory)


def test_wrong_shape(tmp_path: Path) -> None:
    directory = save_sharded(tiny_llama(), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 192
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match=r"do not match the shapes .*gate_proj\.weight is \[256, 128\], the config"):
        ShardSource(directory)


def test_extra_tensors(tmp_path: Path) -> None:
    big = tmp_path / "big"
    tiny_llama().save_pretrained(big)
    config = json.loads((big / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (big / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match=r"9 tensors that .* has no place for: model\.layers\.1\..*another model"):
        ShardSource(big)


def test_damaged_header(tmp_path: Path) -> None:
    directory = save_sharded(tiny_llama(), tmp_path / "m")
    shard = sorted(directory.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b"x" * length
    shard.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match=rf"{shard.name} is a damaged safetensors file \(its header is not JSON"):
        ShardSource(directory)
    shard.write_bytes(struct.pack("<Q", 10**7) + b"{}")
    with pytest.raises(LowbitError, match=r"damaged safetensors file \(its header claims 10000000 bytes"):
        ShardSource(directory)


def test_truncated_data(tmp_path: Path) -> None:
    directory = save_sharded(tiny_llama(), tmp_path / "m")
    shard = sorted(directory.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(LowbitError, match=r"damaged safetensors file \('.*' does not fit"):
        ShardSource(directory)


def test_index_names_a_missing_shard(tmp_path: Path) -> None:
    directory = save_sharded(tiny_llama(), tmp_path / "m")
    _rewrite_index(directory, {"model.norm.weight": "model-99.safetensors"})
    with pytest.raises(LowbitError, match=r"names model-99\.safetensors, which is not in"):
        ShardSource(directory)


# ---- open_source and the streaming GGUF conversion ---------------------------------------------------


def test_open_source_directory_and_bin(tmp_path: Path) -> None:
    model = tiny_llama()
    tok = bpe_tokenizer()
    model.save_pretrained(tmp_path / "st", max_shard_size="100KB")
    tok.save_pretrained(tmp_path / "st")
    source, tokenizer = open_source(str(tmp_path / "st"))
    assert isinstance(source, ShardSource) and tokenizer.pad_token is not None
    model.config.save_pretrained(tmp_path / "bin")  # an older checkpoint: pickled weights
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    tok.save_pretrained(tmp_path / "bin")
    source, _ = open_source(str(tmp_path / "bin"))
    assert isinstance(source, InMemorySource)
    assert_same_state(source.model, model)


def _transformers_gguf(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("llama", True), ("qwen2", True)])
def test_streaming_gguf_conversion_equals_transformers(
    arch: str, tie: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = quantized(arch, g("int4", 32), tie=tie)
    path, _ = export(model, tmp_path / "gguf")
    monkeypatch.setattr(lowbit.models, "_CHUNK_BYTES", 3000)  # tensors dequantized a few rows at a time
    target = tmp_path / "converted"
    _convert_gguf(path, target, max_shard_bytes=200_000)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert ("lm_head.weight" in index["weight_map"]) is not tie
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    reference = _transformers_gguf(path)
    streamed = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    assert streamed.config.tie_word_embeddings is tie
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) is tie
    assert_same_state(streamed, reference)
    source = ShardSource(target)
    load_all(source)
    assert_same_state(source.model, reference)


def test_open_source_gguf_converts_once(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = export(quantized("llama", g("int4", 32)), tmp_path / "gguf")
    source, tokenizer = open_source(str(path))
    assert isinstance(source, ShardSource) and source.directory == lowbit.models.converted_dir(path)
    assert tokenizer.pad_token is not None

    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(lowbit.models, "_convert_gguf", no_conversion)
    again, _ = open_source(str(path))
    model, _ = load_model(str(path))  # load_model reads the sharded cache entry
    load_all(again)  # type: ignore[arg-type]
    assert_same_state(again.model, model)


def test_gguf_with_a_missing_tensor(tmp_path: Path, cache: Path) -> None:
    import gguf
    import numpy as np

    path, _ = export(quantized("llama", g("int4", 32)), tmp_path / "gguf")
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            writer.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LowbitError, match=r"tensors do not match .*1 missing, e\.g\. model\.layers\.1\.mlp\.up_proj"):
        open_source(str(tmp_path / "cut.gguf"))
    assert not (cache / "converted").exists() or not any((cache / "converted").iterdir())


@pytest.mark.slow
def test_demo_streaming_conversion_equals_transformers(tmp_path: Path) -> None:
    path = fetch_demo_model()
    target = tmp_path / "converted"
    _convert_gguf(path, target)
    reference = _transformers_gguf(path)
    streamed = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # SmolLM2 is tied
    assert_same_state(streamed, reference)
    del streamed
    source = ShardSource(target)
    load_all(source)
    assert_same_state(source.model, reference)
