"""GGUF export: block layouts against gguf's own dequantizers, lowbit's codes carried bit for bit where
the grid matches, re-quantization with notes where it does not, refusals, and the files read back by
gguf.GGUFReader and loaded by transformers (logits against lowbit's model)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tiny_models import tiny_gemma3
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.export import export_model
from lowbit.export.base import quantized_linears
from lowbit.export.gguf_blocks import BLOCK_TYPES, decode, encode_rows, f16, pack
from lowbit.export.gguf_layers import carry_reason, encode_float, encode_quantized
from lowbit.export.gguf_names import GGUF_ARCHS, head_row_order
from lowbit.modules import QuantLinear
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

VOCAB = 320  # the tokenizer has 300 tokens: the rest are padding
TEXTS = [f"the quick brown fox jumps over the lazy dog {i} times, said Zoë" for i in range(40)]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def g(fmt: str, group: int | None, symmetric: bool = True, scale: str = "float16") -> QuantSpec:
    gran = "group" if group else "channel"
    return QuantSpec(fmt, gran, group, symmetric, scale_dtype=scale)


# ---- tiny models and tokenizers ---------------------------------------------------------------------


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A trained byte-level BPE (gpt2 kind) with special tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(TEXTS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.chat_template = CHAT
    return hf


def spm_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (llama kind): Metaspace, byte fallback tokens, BOS added."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build(arch: str, wide: bool = False, tie: bool = True, seed: int = 0) -> nn.Module:
    """A tiny llama/qwen2 whose rows fit blocks of 32 (``wide``: of 256, for the K-quants)."""
    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(
        hidden_size=256 if wide else 128,
        intermediate_size=512 if wide else 256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64 if wide else 32,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    return model_cls(config_cls(**shape)).to(torch.float32).eval()


def quantized(arch: str, scheme: Scheme | QuantSpec, wide: bool = False, tie: bool = True) -> nn.Module:
    model = build(arch, wide, tie)
    scheme = scheme if isinstance(scheme, Scheme) else Scheme(weights=scheme)
    calib = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    api.quantize(model, Recipe(scheme, (Step("rtn"),)), calib, progress=False)
    return model


def export(model: nn.Module, out: Path, tokenizer: Any = None, **options: str) -> tuple[Path, list[str]]:
    res = export_model(model, tokenizer or bpe_tokenizer(), "gguf", out, options)
    assert len(res.files) == 1 and res.files[0].startswith("model-") and res.files[0].endswith(".gguf")
    return out / res.files[0], res.notes


# ---- reading back ---------------------------------------------------------------------------------------


def read_back(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], gguf.GGUFReader]:
    """name -> (type name, float32 values (rows, cols) as gguf's dequantizer gives them)."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return tensors, reader


def field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's ``permute`` (reshape(n_head, 2, half).swapaxes(1, 2)) of attn_q/attn_k rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lowbit_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """GGUF name -> lowbit's weight (dequantized for QuantLinear) in HF row order."""
    arch = GGUF_ARCHS[model.config.model_type]
    modules = dict(model.named_modules())
    out = {}
    for key, tensor in model.state_dict().items():
        name = arch.gguf_name(key)
        assert name is not None, key
        owner = modules.get(key.rpartition(".")[0])
        if isinstance(owner, QuantLinear) and owner.qweight is not None and key.endswith(".weight"):
            out[name] = owner.qweight.dequantize().numpy()
        else:
            out[name] = tensor.detach().to(torch.float32).numpy()
    return out


def file_weights(model: nn.Module, path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """The file's tensors, attn_q/attn_k back in HF row order for llama."""
    tensors, _ = read_back(path)
    if model.config.model_type == "llama":
        for name, (typ, w) in list(tensors.items()):
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = model.config.num_attention_heads if "attn_q" in name else model.config.num_key_value_heads
                tensors[name] = (typ, unpermute(w, heads))
    return tensors


def is_quantized(model: nn.Module, name: str) -> bool:
    return name.startswith("blk.") and name.endswith(".weight") and "norm" not in name


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    return model(input_ids=ids).logits


def with_f16_embeddings(model: nn.Module) -> nn.Module:
    """lowbit's model with the embedding and the (float) lm_head rounded to float16, as the file stores them."""
    ref = copy.deepcopy(model)
    for m in (ref.get_input_embeddings(), ref.get_output_embeddings()):
        m.weight.data = m.weight.data.half().float()
    return ref


def load(path: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


# ---- block layouts ---------------------------------------------------------------------------------------


def random_fields(name: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = BLOCK_TYPES[name]
    d = f16(rng.uniform(-1, 1, n))
    if name == "Q4_K":
        return {
            "u": rng.integers(0, 16, (n, 256)),
            "d": d,
            "dmin": f16(rng.uniform(0, 1, n)),
            "sc": rng.integers(0, 64, (n, 8)),
            "mn": rng.integers(0, 64, (n, 8)),
        }
    if name == "Q6_K":
        return {"k": rng.integers(-32, 32, (n, 256)), "d": d, "sc": rng.integers(-128, 128, (n, 16))}
    if t.affine:
        return {"u": rng.integers(0, t.umax + 1, (n, t.size)), "d": d, "m": f16(rng.uniform(-1, 1, n))}
    return {"k": rng.integers(t.kmin, t.kmax + 1, (n, t.size)), "d": d}


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_block_layout_decodes_as_gguf_reads_it(name: str) -> None:
    """Every code, scale and min value, packed by us and read by gguf.quants, gives our decoded values."""
    t = BLOCK_TYPES[name]
    fields = random_fields(name, 64, np.random.default_rng(0))
    data = pack(t, fields)
    assert data.shape == (64, gguf.GGML_QUANT_SIZES[t.ggml][1]) and data.dtype == np.uint8
    ours = decode(t, fields)
    theirs = gguf.quants.dequantize(data, t.ggml)
    assert np.array_equal(ours, theirs)
    assert np.unique(ours).size > t.umax  # not a degenerate sample


# the K-quants have no quantizer in gguf-py: they must beat the legacy type of as many bits (or one more)
KQUANT_BEATS = {"Q4_K": "Q4_1", "Q6_K": "Q5_1"}


def _fit_error(name: str, w: np.ndarray) -> float:
    t = BLOCK_TYPES[name]
    data, values = encode_rows(t, w)
    assert np.array_equal(gguf.quants.dequantize(data, t.ggml), values)
    return float(np.linalg.norm(values - w) / np.linalg.norm(w))


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
def test_fitting_floats(name: str) -> None:
    t = BLOCK_TYPES[name]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    w[0, :256] = 0.0  # an all-zero block
    w[1, :256] = -0.75  # a constant one
    _, values = encode_rows(t, w)
    assert np.all(values[0, :256] == 0)
    np.testing.assert_allclose(values[1, :256], -0.75, rtol=2e-3)
    err = _fit_error(name, w)
    if name in KQUANT_BEATS:
        assert err < 0.95 * _fit_error(KQUANT_BEATS[name], w)
    else:  # as good as llama.cpp's reference quantizer, which gguf-py reproduces
        ref = gguf.quants.dequantize(gguf.quants.quantize(w, t.ggml), t.ggml)
        assert err <= 1.001 * np.linalg.norm(ref - w) / np.linalg.norm(w)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_kquant_requantization_stays_on_lowbit_grid(name: str) -> None:
    """A per-channel int4 weight re-quantized into a K-quant keeps its grid, up to the rounding of the
    sub-block scales; fitted from scratch (no grid) it loses several percent."""
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(2))
    qw = quantize_weight(w, g("int4", None))
    ref = qw.dequantize().numpy()
    kept = encode_quantized(qw, name)
    scratch = encode_float(qw.dequantize(), name)
    err_kept = np.linalg.norm(kept.values - ref) / np.linalg.norm(ref)
    err_scratch = np.linalg.norm(scratch.values - ref) / np.linalg.norm(ref)
    assert not kept.carried and "sub-block scales" in kept.reason
    assert err_kept < 1e-3 < 0.01 < err_scratch


# ---- names and permutation --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensor_names_match_gguf_tables(arch: str) -> None:
    model = build(arch, tie=False)
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), model.config.num_hidden_layers)
    for key in model.state_dict():
        assert GGUF_ARCHS[arch].gguf_name(key) == table.get_name(key, try_suffixes=(".weight", ".bias")), key


def test_head_row_order_is_what_transformers_reverses() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(3).standard_normal((6 * 8, 5)).astype(np.float32)
    permuted = w[head_row_order(48, 6)]
    assert not np.array_equal(permuted, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, 6, 6), w)
    assert np.array_equal(unpermute(permuted, 6), w)


# ---- exact exports ---------------------------------------------------------------------------------------

EXACT = [
    ("llama", g("int4", 32), "Q4_0", True),
    ("qwen2", g("int4", 32), "Q4_0", False),
    ("llama", g("int8", 32), "Q8_0", False),
    ("llama", g("int5", 32), "Q5_0", True),
    ("llama", g("int4", 128), "Q4_0", True),  # groups of 128 repeat their scale over 4 blocks of 32
    ("qwen2", g("int8", None), "Q8_0", True),  # per channel likewise
]


@pytest.mark.parametrize(("arch", "spec", "qtype", "tie"), EXACT, ids=[f"{a}-{s.describe()}" for a, s, _, _ in EXACT])
def test_exact_grid_is_carried_bit_for_bit(arch: str, spec: QuantSpec, qtype: str, tie: bool, tmp_path: Path) -> None:
    model = quantized(arch, spec, tie=tie)
    path, notes = export(model, tmp_path / "out")  # no type: the smallest that holds the grid
    assert path.name == f"model-{qtype}.gguf"
    assert any("lowbit's codes unchanged" in n and "bit for bit" in n for n in notes), notes
    assert not any("re-quantized" in n for n in notes)
    tensors = file_weights(model, path)
    expected = lowbit_weights(model)
    assert ("output.weight" in tensors) == (not tie)
    assert set(tensors) == set(expected) - ({"output.weight"} if tie else set())
    for name, (typ, values) in tensors.items():
        want = expected[name]
        if is_quantized(model, name):
            assert typ == qtype, name
            assert np.array_equal(values, want), name  # bit for bit
        elif name in ("token_embd.weight", "output.weight"):
            assert typ == "F16" and np.array_equal(values, want.astype(np.float16).astype(np.float32)), name
        else:  # norms, qwen2's q/k/v biases
            assert typ == "F32" and np.array_equal(values, want), name
    ref = with_f16_embeddings(model)
    torch.testing.assert_close(logits(load(path)), logits(ref), atol=2e-5, rtol=2e-5)


def test_metadata_and_tokenizer(tmp_path: Path) -> None:
    model = quantized("llama", g("int4", 32))
    tok = bpe_tokenizer()
    path, notes = export(model, tmp_path / "out", tok)
    _, reader = read_back(path)
    c = model.config
    for key, want in {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.block_count": c.num_hidden_layers,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.head_dim,
        "llama.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.bos_token_id,
        "tokenizer.ggml.eos_token_id": tok.eos_token_id,
        "tokenizer.chat_template": CHAT,
    }.items():
        assert field(reader, key) == want, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_parameters["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:300] == [tok.convert_ids_to_tokens(i) for i in range(300)]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert set(types[300:]) == {gguf.TokenType.UNUSED}
    assert any("padded" in n for n in notes) and any("tied" in n for n in notes)
    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the lazy fox, said Zoë", "  twice 123 <|im_end|>", TEXTS[3]]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text
    assert loaded.chat_template == CHAT


def test_sentencepiece_style_tokenizer(tmp_path: Path) -> None:
    tok = spm_tokenizer()
    path, _ = export(quantized("llama", g("int8", 32)), tmp_path / "out", tok)
    _, reader = read_back(path)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    types, scores = field(reader, "tokenizer.ggml.token_type"), field(reader, "tokenizer.ggml.scores")
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    # llama.cpp merges the pair whose result scores highest: the scores follow the merges' order
    merges = field(reader, "tokenizer.ggml.merges")
    merged = [tokens.index(m.replace(" ", "")) for m in merges[:20]]
    assert all(scores[a] > scores[b] for a, b in itertools.pairwise(merged))
    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the lazy fox jumps", "Zoë said ü", TEXTS[7]]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text


# ---- grids GGUF holds up to a float16 minimum, and re-quantized ones ----------------------------------------


def test_asymmetric_uint4_goes_to_q4_1_with_rounded_minimum(tmp_path: Path) -> None:
    model = quantized("llama", g("uint4", 32, symmetric=False))
    path, notes = export(model, tmp_path / "out")
    assert path.name == "model-Q4_1.gguf"
    (note,) = [n for n in notes if "codes unchanged" in n]
    tensors, expected = file_weights(model, path), lowbit_weights(model)
    worst = 0.0
    for name, m in dict(model.named_modules()).items():
        if not isinstance(m, QuantLinear) or m.qweight is None:
            continue
        gname = GGUF_ARCHS["llama"].gguf_name(name + ".weight")
        assert gname is not None
        typ, values = tensors[gname]
        qw = m.qweight
        minimum = (-qw.scale.float() * qw.zero_point).numpy()  # (out, in/32): m of each block
        exact_m = np.repeat(f16(minimum).astype(np.float32) == minimum, 32, axis=1)
        diff = np.abs(values - expected[gname])
        assert typ == "Q4_1"
        assert np.all(diff[exact_m] == 0)  # blocks whose m is a float16: bit for bit
        # elsewhere only m moved, by at most half a float16 step of m
        bound = np.repeat(np.abs(minimum) * 2.0**-11, 32, axis=1)
        assert np.all(diff[~exact_m] <= bound[~exact_m] * (1 + 1e-6))
        assert exact_m.any() and not exact_m.all()
        worst = max(worst, float(diff.max()))
    assert f"largest weight change {worst:.3g}" in note and "float16" in note
    torch.testing.assert_close(logits(load(path)), logits(with_f16_embeddings(model)), atol=2e-3, rtol=1e-3)


def _requant_note(notes: list[str], qtype: str) -> str:
    (note,) = [n for n in notes if n.startswith("re-quantized")]
    assert f"into {qtype}" in note
    return note


@pytest.mark.parametrize(("qtype", "bound"), [("Q4_K", 0.01), ("Q6_K", 0.001)])
def test_int4_g128_requantized_into_kquants(qtype: str, bound: float, tmp_path: Path) -> None:
    model = quantized("llama", g("int4", 128), wide=True, tie=False)
    path, notes = export(model, tmp_path / "out", type=qtype)
    note = _requant_note(notes, qtype)
    assert "sub-block scales" in note and "14 linear(s)" in note and "model.layers.0.self_attn.q_proj" in note
    tensors, expected = file_weights(model, path), lowbit_weights(model)
    errs = []
    for name, (typ, values) in tensors.items():
        if is_quantized(model, name):
            assert typ == qtype
            errs.append(np.linalg.norm(values - expected[name]) / np.linalg.norm(expected[name]))
    assert len(errs) == 14 and max(errs) < bound
    assert f"max {max(errs):.3g}" in note
    a, b = logits(load(path)), logits(with_f16_embeddings(model))
    assert (a - b).abs().max() < 10 * bound * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_explicit_type_requantizes_groups_that_straddle_blocks(tmp_path: Path) -> None:
    model = quantized("qwen2", g("int4", 16))
    with pytest.raises(LowbitError, match=r"no GGUF type holds int4 g16.*--opt type=.*Q4_K") as err:
        export(model, tmp_path / "refused")
    assert "model.layers.0.self_attn.q_proj" in str(err.value) and not (tmp_path / "refused").exists()
    path, notes = export(model, tmp_path / "out", type="q4_0")  # type names are case-insensitive
    note = _requant_note(notes, "Q4_0")
    assert "groups of 16 do not line up with Q4_0's blocks of 32" in note
    tensors, expected = file_weights(model, path), lowbit_weights(model)
    errs = [
        np.linalg.norm(v - expected[n]) / np.linalg.norm(expected[n])
        for n, (_, v) in tensors.items()
        if is_quantized(model, n)
    ]
    assert f"max {max(errs):.3g}" in note and 0 < max(errs) < 0.1


def test_act_order_and_float_grids_are_not_carried() -> None:
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(4))
    qw = quantize_weight(w, g("int4", 32))
    assert carry_reason(qw, BLOCK_TYPES["Q4_0"]) is None
    qw.g_idx = qw.g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    assert "act-order" in str(carry_reason(qw, BLOCK_TYPES["Q4_0"]))
    fp8 = quantize_weight(w, QuantSpec("fp8_e4m3", "channel", None))
    assert "float grid" in str(carry_reason(fp8, BLOCK_TYPES["Q8_0"]))
    int8_asym = quantize_weight(w, g("uint8", 32, symmetric=False))
    assert "[-255, 255]" in str(carry_reason(int8_asym, BLOCK_TYPES["Q8_0"]))
    assert carry_reason(quantize_weight(w, g("uint4", 32, symmetric=False)), BLOCK_TYPES["Q5_0"]) is None
    uint5 = quantize_weight(w, g("uint5", 32, symmetric=False))
    assert carry_reason(uint5, BLOCK_TYPES["Q5_1"]) is None
    assert "32 levels; Q4_1 has 16" in str(carry_reason(uint5, BLOCK_TYPES["Q4_1"]))
    assert "[-31, 31]; Q5_0 holds [-16, 15]" in str(carry_reason(uint5, BLOCK_TYPES["Q5_0"]))


def test_embeddings_option(tmp_path: Path) -> None:
    model = quantized("llama", g("int4", 32), tie=False)
    path, notes = export(model, tmp_path / "f32", embeddings="f32")
    tensors, _ = read_back(path)
    assert tensors["token_embd.weight"][0] == "F32" and tensors["output.weight"][0] == "F32"
    torch.testing.assert_close(logits(load(path)), logits(model), atol=2e-5, rtol=2e-5)
    path, notes = export(model, tmp_path / "q8", embeddings="Q8_0")
    tensors, _ = read_back(path)
    assert tensors["token_embd.weight"][0] == "Q8_0" and any("token_embd.weight written as Q8_0" in n for n in notes)
    path, notes = export(model, tmp_path / "f16", type="f16")
    tensors, _ = read_back(path)
    assert path.name == "model-f16.gguf" and tensors["blk.1.ffn_down.weight"][0] == "F16"
    assert any(n.startswith("14 quantized linear(s) written as lowbit's dequantized weights in f16") for n in notes)


# ---- refusals ---------------------------------------------------------------------------------------------


def _refused(model: nn.Module, tmp_path: Path, match: str, tokenizer: Any = None, **options: str) -> None:
    with pytest.raises(LowbitError, match=match):
        export(model, tmp_path / "out", tokenizer, **options)
    assert not (tmp_path / "out").exists()


def test_refuses_activation_and_kv_quantization(tmp_path: Path) -> None:
    acts = QuantSpec("int8", "token", None, dynamic=True)
    _refused(quantized("llama", Scheme(weights=g("int8", 32), input_activations=acts)), tmp_path, "input activations")
    kv = QuantSpec("int8", "token", None, dynamic=True)
    _refused(quantized("llama", Scheme(weights=g("int4", 32), kv_cache=kv)), tmp_path, "KV cache.*--cache-type-k")


def test_refuses_float_columns_shapes_and_architectures(tmp_path: Path) -> None:
    model = quantized("llama", g("int4", 32))
    layer = model.model.layers[0].mlp.up_proj
    layer.qweight.outlier_idx = torch.tensor([3])
    layer.qweight.outlier_weight = torch.zeros(layer.out_features, 1, dtype=torch.float16)
    _refused(model, tmp_path, r"float columns.*model\.layers\.0\.mlp\.up_proj")
    narrow = quantized("llama", g("int4", 32))
    _refused(narrow, tmp_path, r"shape: rows of 128 .* Q4_K .*self_attn\.q_proj", type="Q4_K")
    _refused(tiny_gemma3(), tmp_path, "architecture: 'gemma3_text'.*llama, qwen2")
    _refused(narrow, tmp_path, "not a type; choose one of: f32, f16, Q8_0", type="Q3_K")


def test_refuses_a_tokenizer_the_model_cannot_hold(tmp_path: Path) -> None:
    model = quantized("llama", g("int4", 32))
    model.resize_token_embeddings(256)
    _refused(model, tmp_path, "token ids up to 299 but the model's embedding has only 256 rows")
    with pytest.raises(LowbitError, match="carry the tokenizer"):
        export_model(model, None, "gguf", tmp_path / "none", {})
    assert not (tmp_path / "none").exists()


# ---- the demo model -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_int4_g32_exports_to_q4_0(tmp_path: Path) -> None:
    model, tok = api.load_model("demo")
    calib = tok(["RTN needs no calibration; the pipeline runs the blocks once."], return_tensors="pt")["input_ids"]
    api.quantize(model, Recipe(Scheme(weights=g("int4", 32)), (Step("rtn"),)), calib, progress=False)
    path, notes = export(model, tmp_path / "out", tok)
    assert path.name == "model-Q4_0.gguf" and any("bit for bit" in n for n in notes), notes
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = load(path)(input_ids=ids).logits, with_f16_embeddings(model)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert notes[0].startswith(f"{len(quantized_linears(model))} quantized linear(s) written as Q4_0")
