"""The ``tokenizer.*`` metadata of a GGUF file, read off a Hugging Face fast tokenizer.

llama.cpp (and transformers' GGUF reader) rebuild the tokenizer from: the model kind
(``gpt2``: byte-level BPE; ``llama``: SentencePiece-style BPE with byte fallback), the token
strings by id with their types, the merges, the special token ids, whether BOS/EOS are added,
the pre-tokenizer's name and the chat template. Other tokenizer models (Unigram, WordPiece)
are refused. A vocabulary smaller than the embedding is padded with unused ``[PAD<i>]`` tokens,
as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, TokenType

from lowbit.errors import LowbitError

# HF pre-tokenizer steps (see _steps) -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",
    (
        r"Split((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
        "ByteLevel",
    ): "llama-bpe",
    (
        r"Split((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
        "ByteLevel",
    ): "qwen2",
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class TokenizerMeta:
    model: str  # gpt2 | llama
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def write(self, w: GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_merges(self.merges)
        adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
        adders["pad"] = w.add_pad_token_id
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _steps(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """A pre-tokenizer as a tuple of step descriptions, e.g. ``("Digits(individual)", "ByteLevel(regex)")``."""
    if pre is None:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    kind = str(pre.get("type"))
    if kind == "ByteLevel":
        return (
            ("ByteLevel(prefix)",)
            if pre.get("add_prefix_space")
            else ("ByteLevel(regex)" if pre.get("use_regex") else kind,)
        )
    if kind == "Digits":
        return ("Digits(individual)" if pre.get("individual_digits") else kind,)
    if kind == "Split" and isinstance(pre.get("pattern"), dict) and "Regex" in pre["pattern"]:
        return (f"Split({pre['pattern']['Regex']})",)
    return (kind,)


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer and, for a Sequence, its members."""
    if not node:
        return []
    return [p for n in node.get(key, []) for p in _parts(n, key)] if node.get("type") == "Sequence" else [node]


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (Metaspace or a Prepend normalizer)."""
    for p in _parts(spec.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace" and (p.get("prepend_scheme", "always") != "never" or p.get("add_prefix_space")):
            return True
    return any(n.get("type") == "Prepend" for n in _parts(spec.get("normalizer"), "normalizers"))


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether the tokenizer puts ``token_id`` first (last) when special tokens are added."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def tokenizer_meta(tokenizer: Any, n_vocab: int) -> TokenizerMeta:
    """Metadata for ``tokenizer``, padded to the model's ``n_vocab`` embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError(
            "GGUF export needs a fast (tokenizers-backed) tokenizer to read the vocabulary and merges from; "
            f"got {type(tokenizer).__name__}. Load the model's tokenizer with AutoTokenizer (use_fast=True)"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    decoder = spec.get("decoder") or {}
    steps = _steps(spec.get("pre_tokenizer"))
    byte_level = any(s.startswith("ByteLevel") for s in steps) or decoder.get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise LowbitError(
            f"the tokenizer is a {model.get('type')} model without byte-level pre-tokenization or byte fallback; "
            "the GGUF exporter writes byte-level BPE (gpt2) and SentencePiece-style BPE (llama) vocabularies only"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    top = max(vocab.values()) + 1
    if top > n_vocab:
        raise LowbitError(
            f"the tokenizer has token ids up to {top - 1} but the model's embedding has only {n_vocab} rows; "
            "pass the tokenizer the model was trained with"
        )
    kind = "gpt2" if byte_level else "llama"
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.NORMAL)
        if kind == "llama" and _BYTE_TOKEN.fullmatch(text):
            types[i] = int(TokenType.BYTE)
        elif i in added:
            types[i] = int(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    if ids["unk"] is not None:
        types[ids["unk"]] = int(TokenType.UNKNOWN)
    merges = _merges(model)
    meta = TokenizerMeta(
        model=kind,
        pre=PRE_TOKENIZERS.get(steps, "default"),
        tokens=tokens,
        types=types,
        merges=merges,
        special_ids={k: int(v) for k, v in ids.items() if v is not None},
        add_bos=_adds(tokenizer, ids["bos"], first=True),
        add_eos=_adds(tokenizer, ids["eos"], first=False),
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    )
    if kind == "llama":
        meta.scores = _merge_scores(tokens, merges)
        meta.add_space_prefix = _space_prefix(spec)
    if meta.pre == "default" and kind == "gpt2":
        meta.notes.append(
            f"the tokenizer's pre-tokenizer {list(steps)} is not one llama.cpp names; wrote "
            "tokenizer.ggml.pre=default, so llama.cpp may split text differently from the Hugging Face tokenizer"
        )
    if top < n_vocab:
        meta.notes.append(
            f"the vocabulary ({top} tokens) is padded to the embedding's {n_vocab} rows with unused tokens"
        )
    return meta


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores that make llama.cpp merge in the BPE merges' order: the token
    made by merge r scores -(r+1); tokens no merge makes score below all of them."""
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    low = -float(len(merges) + 1)
    return [-(rank[t] + 1.0) if t in rank else low for t in tokens]
