"""Generation similarity: ROUGE-L against hand-computed values and a brute-force LCS, seeded
sampling, and the embedding score with a tiny sentence-transformers model built here."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama

from lowbit.errors import LowbitError
from lowbit.eval.similarity import (
    NO_EMBEDDING,
    embedding_cosines,
    generation_similarity,
    lcs_length,
    load_prompts,
    rouge_l,
    sampled,
    words,
)
from lowbit.generate import torch_step


def _brute_lcs(a: list[str], b: list[str]) -> int:
    """The longest subsequence of ``a`` (all of them, longest first) that is also one of ``b``."""

    def is_sub(s: tuple[str, ...], t: list[str]) -> bool:
        it = iter(t)
        return all(x in it for x in s)

    for k in range(len(a), 0, -1):
        if any(is_sub(c, b) for c in itertools.combinations(a, k)):
            return k
    return 0


def test_rouge_l_hand_computed() -> None:
    ref, cand = words("The cat sat on the mat."), words("the cat, on a MAT")
    assert ref == ["the", "cat", "sat", "on", "the", "mat"]
    assert lcs_length(ref, cand) == 4  # the cat on mat
    r = rouge_l(ref, cand)
    assert r["precision"] == pytest.approx(4 / 5)
    assert r["recall"] == pytest.approx(4 / 6)
    assert r["f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))  # 0.72727...
    assert rouge_l([1, 2, 3], [3, 2, 1])["f1"] == pytest.approx(1 / 3)
    assert rouge_l([], []) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert rouge_l(["a"], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_l(["a", "b"], ["c"])["f1"] == 0.0


def test_lcs_equals_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(60):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _brute_lcs(a, b), (a, b)


def test_sampling_is_seeded_and_differs_from_greedy() -> None:
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    a = sampled(torch_step(model), ids, 12, seed=3, temperature=1.0)
    b = sampled(torch_step(model), ids, 12, seed=3, temperature=1.0)
    c = sampled(torch_step(model), ids, 12, seed=4, temperature=1.0)
    assert a.shape == (1, 12) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(LowbitError, match="temperature"):
        sampled(torch_step(model), ids, 4, seed=0, temperature=0.0)


def test_same_model_scores_one_and_other_model_is_scored_per_sample() -> None:
    tok = byte_tokenizer()
    model, other = tiny_llama(0), tiny_llama(1)
    prompts = ["Hello there", "To be or not"]
    same = generation_similarity(model, model, tok, prompts, max_new_tokens=6, seed=1, progress=False)
    for mode in ("greedy", "sampled"):
        assert same[mode] == {"rouge_l": 1.0, "exact_match": 1.0, "embedding_cosine": None}
    assert same["embedding_note"] == NO_EMBEDDING
    diff = generation_similarity(model, other, tok, prompts, max_new_tokens=6, seed=1, progress=False)
    assert diff["greedy"]["exact_match"] < 1.0
    for mode in ("greedy", "sampled"):
        per = [rouge_l(words(s[mode]["original"]), words(s[mode]["quantized"]))["f1"] for s in diff["samples"]]
        assert [s[mode]["rouge_l"] for s in diff["samples"]] == per
        assert diff[mode]["rouge_l"] == pytest.approx(sum(per) / len(per))
    json.dumps(diff)  # JSON-ready


def _tiny_sentence_model(path: Path) -> Path:
    """A sentence-transformers model from scratch: a 1-layer random BERT over a 7-word vocabulary
    (word-level tokenizer), mean pooling; saved to ``path``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    bert_dir = path / "bert"
    bert_dir.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "a", "the", "cat", "dog", "sat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(bert_dir)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    BertModel(cfg).save_pretrained(bert_dir)
    word = Transformer(str(bert_dir), max_seq_length=32)
    st = SentenceTransformer(modules=[word, Pooling(16, pooling_mode="mean")], device="cpu")
    st.save(str(path / "st"))
    return path / "st"


def test_embedding_score_with_a_tiny_local_model(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    st_dir = _tiny_sentence_model(tmp_path)
    a, b = ["the cat", "the dog sat", "a cat"], ["the cat", "a dog", "dog"]
    cos = embedding_cosines(str(st_dir), a, b)
    enc = SentenceTransformer(str(st_dir), device="cpu")
    ea, eb = enc.encode(a, convert_to_tensor=True), enc.encode(b, convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(ea, eb, dim=-1)
    assert cos == pytest.approx(expected.tolist(), abs=1e-5)
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and max(cos[1:]) < 0.99

    tok, model = byte_tokenizer(), tiny_llama(0)
    res = generation_similarity(model, model, tok, ["the cat"], 4, embedding_model=str(st_dir), progress=False)
    assert res["greedy"]["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert res["embedding_note"] is None


def test_hub_name_is_never_downloaded_unasked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(LowbitError, match="allow-download"):
        embedding_cosines("someone/not-cached-model", ["a"], ["b"])


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt \n")
    assert load_prompts(txt) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert load_prompts(jl) == ["a", "b"]
    jl.write_text('{"other": 1}\n')
    with pytest.raises(LowbitError, match=r"p.jsonl:1 has no"):
        load_prompts(jl)
    with pytest.raises(LowbitError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(LowbitError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
