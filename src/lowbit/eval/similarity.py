"""Generation similarity ("Give Me BF16 or Give Me Death"): how close the quantized model's text is
to the original's, on the same prompts.

For every prompt both models continue the text twice: greedily, and by seeded sampling (the same
seed for both models, so where their next-token distributions agree they draw the same token).
Each pair of continuations is scored with ROUGE-L (longest common subsequence of words) and, when a
sentence-transformers model is given, with the cosine similarity of the two texts' embeddings.
The embedding model is never downloaded silently: a Hub name is loaded from the local cache only,
unless the caller allows downloads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.generate import Step, eos_ids, greedy, prompt_ids, torch_step

__all__ = [
    "default_prompts",
    "embedding_cosines",
    "generation_similarity",
    "lcs_length",
    "load_prompts",
    "rouge_l",
    "sampled",
    "words",
]

NO_EMBEDDING = "no --embedding-model given: the embedding similarity is left out (lowbit downloads no model unasked)"


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len a * len b))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: Sequence[Any], candidate: Sequence[Any]) -> dict[str, float]:
    """ROUGE-L of two token lists (Lin 2004): recall = LCS / len(reference), precision = LCS /
    len(candidate), F1 their harmonic mean (beta = 1, as the ``rouge-score`` package reports).
    Two empty lists score 1 (identical); one empty list scores 0."""
    if not reference and not candidate:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    p, r = lcs / len(candidate), lcs / len(reference)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r)}


def words(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits (the ``rouge-score`` default, without stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.jsonl`` (one object per line with a ``prompt`` or ``text`` field) or
    any other text file (one prompt per non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"prompt file {p} does not exist; give a .txt (one prompt a line) or .jsonl file, or 'demo'")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix.lower() != ".jsonl":
        prompts = [ln.strip() for ln in lines]
    else:
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise LowbitError(f"{p}:{i} is not valid JSON ({exc.msg})") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise LowbitError(f"{p}:{i} has no non-empty 'prompt' or 'text' string field")
            prompts.append(text)
    if not prompts:
        raise LowbitError(f"prompt file {p} holds no prompts")
    return prompts


def default_prompts(source: str = "demo", n: int = 8, n_words: int = 12) -> list[str]:
    """``n`` prompts from the held-out split of an evaluation text: the first ``n_words`` words of
    lines of at least 8 words, taken at evenly spaced places through the text (deterministic)."""
    from lowbit.data import load_texts

    lines = [ln.strip() for t in load_texts(source, "eval") for ln in t.splitlines()]
    long = [ln for ln in lines if len(ln.split()) >= 8]
    if len(long) < n:
        raise LowbitError(f"the evaluation text {source!r} has only {len(long)} lines of 8+ words; need {n} prompts")
    step = len(long) / n
    return [" ".join(long[int(i * step)].split()[:n_words]) for i in range(n)]


@torch.inference_mode()
def sampled(
    step: Step, ids: torch.Tensor, new_tokens: int, seed: int, temperature: float, eos: set[int] | None = None
) -> torch.Tensor:
    """Sampled continuation of ``ids`` (1, S): ``new_tokens`` tokens at most, each drawn from
    softmax(logits / temperature) with a generator seeded by ``seed`` (so two models with equal
    distributions draw equal tokens); stops at a token in ``eos``. Returns (1, n) token ids."""
    if temperature <= 0:
        raise LowbitError(f"the sampling temperature must be positive, got {temperature}")
    gen = torch.Generator().manual_seed(seed)
    logits, past = step(ids, None)
    tokens: list[torch.Tensor] = []
    while True:
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        tokens.append(nxt)
        if len(tokens) >= new_tokens or int(nxt) in (eos or set()):
            break
        logits, past = step(nxt.to(ids.device), past)
    return torch.cat(tokens, dim=1)


def embedding_cosines(model: str, a: list[str], b: list[str], allow_download: bool = False) -> list[float]:
    """Cosine similarity of the sentence embeddings of ``a[i]`` and ``b[i]``, from the
    sentence-transformers model ``model`` (a local directory, or a Hub name found in the local
    cache; fetched from the Hub only with ``allow_download``)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise LowbitError("the embedding similarity needs sentence-transformers: pip install 'lowbit[tasks]'") from None
    local = Path(model).expanduser()
    try:
        if local.exists():
            encoder = SentenceTransformer(str(local), device="cpu", local_files_only=True)
        else:
            encoder = SentenceTransformer(model, device="cpu", local_files_only=not allow_download)
    except (OSError, ValueError) as exc:
        hint = "" if allow_download else "; it is looked up in the local cache only: add --allow-download to fetch it"
        raise LowbitError(f"could not load the sentence-transformers model {model!r} ({exc}){hint}") from None
    ea = encoder.encode(a, convert_to_tensor=True, normalize_embeddings=True)
    eb = encoder.encode(b, convert_to_tensor=True, normalize_embeddings=True)
    return (ea.float() * eb.float()).sum(-1).clamp(-1.0, 1.0).tolist()


def _continue(model: nn.Module, ids: torch.Tensor, mode: str, max_new: int, seed: int, temp: float, eos: set[int]):
    step = torch_step(model)
    if mode == "greedy":
        return greedy(step, ids, max_new, eos)[0]
    return sampled(step, ids, max_new, seed, temp, eos)


def generation_similarity(
    original: nn.Module,
    quantized: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 48,
    seed: int = 0,
    embedding_model: str | None = None,
    *,
    temperature: float = 0.7,
    allow_download: bool = False,
    chat: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy and sampled continuations of ``prompts`` by both models, scored pairwise.

    Prompt ``i`` is sampled with seed ``seed + i`` for both models. ``chat`` feeds prompts through
    the tokenizer's chat template (default: as raw text to continue). Temperature 0.7 is our choice
    for the sampled runs (the paper does not pin one for this comparison).

    Returns a JSON-ready dict: ``greedy`` and ``sampled`` each with the mean ``rouge_l`` (F1 over
    words), ``exact_match`` (fraction of identical token sequences) and ``embedding_cosine`` (mean;
    None without ``embedding_model``, with ``embedding_note`` saying why), plus ``samples`` (per
    prompt: both texts and scores).
    """
    if not prompts:
        raise LowbitError("no prompts to generate from")
    if tokenizer is None:
        raise LowbitError("generation similarity needs a tokenizer; evaluate a model saved with its tokenizer")
    eos = eos_ids(original, tokenizer)
    texts: dict[str, list[tuple[str, str]]] = {"greedy": [], "sampled": []}
    same: dict[str, list[bool]] = {"greedy": [], "sampled": []}
    for m in (original, quantized):
        m.eval()
    bar = tqdm(total=2 * len(prompts), desc="generations", disable=not progress, unit="prompt")
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, prompt, chat)
        for mode in ("greedy", "sampled"):
            a = _continue(original, ids, mode, max_new_tokens, seed + i, temperature, eos)
            b = _continue(quantized, ids, mode, max_new_tokens, seed + i, temperature, eos)
            same[mode].append(a.tolist() == b.tolist())
            decode = tokenizer.decode
            texts[mode].append(
                (decode(a[0].tolist(), skip_special_tokens=True), decode(b[0].tolist(), skip_special_tokens=True))
            )
            bar.update(1)
    bar.close()
    out: dict[str, Any] = {
        "n_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "temperature": temperature,
        "embedding_model": embedding_model,
        "embedding_note": None if embedding_model else NO_EMBEDDING,
    }
    samples: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    all_cos = None
    if embedding_model:  # one load of the encoder for both modes
        pairs_all = texts["greedy"] + texts["sampled"]
        all_cos = embedding_cosines(
            embedding_model, [x for x, _ in pairs_all], [y for _, y in pairs_all], allow_download
        )
    for k, (mode, pairs) in enumerate(texts.items()):
        rouge = [rouge_l(words(x), words(y))["f1"] for x, y in pairs]
        cos = None if all_cos is None else all_cos[k * len(prompts) : (k + 1) * len(prompts)]
        out[mode] = {
            "rouge_l": sum(rouge) / len(rouge),
            "exact_match": sum(same[mode]) / len(same[mode]),
            "embedding_cosine": None if cos is None else sum(cos) / len(cos),
        }
        shown: list[float | None] = list(cos) if cos is not None else [None] * len(pairs)
        for s, (x, y), r, c in zip(samples, pairs, rouge, shown, strict=True):
            s[mode] = {"original": x, "quantized": y, "rouge_l": r, "embedding_cosine": c}
    out["samples"] = samples
    return out
