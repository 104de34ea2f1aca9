"""Greedy generation with a KV cache, timed: what ``lowbit run`` and ``lowbit bench`` drive.

Every path is driven by the same loop (:func:`greedy`): one forward pass over the prompt
(prefill, which yields the first new token), then one pass per decode step feeding the last
token with the cache. Torch models compute the logits of the last position only
(``logits_to_keep=1``, as ``generate`` does).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

# (input_ids (B, S), cache or None) -> (logits of the last position (B, V), cache)
Step = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


@dataclass
class Timing:
    batch: int
    prompt_len: int
    steps: int  # decode steps (one token per sequence each)
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tok_s(self) -> float | None:
        return self.batch * self.steps / self.decode_s if self.steps else None


def torch_step(model: nn.Module) -> Step:
    # transformers renamed the KV cache argument and output from ``past_key_values`` to ``cache``
    # (5.24); use the name this model's forward takes, so neither version warns
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: past})
        return out.logits[:, -1], getattr(out, key)

    return step


@torch.inference_mode()
def greedy(step: Step, ids: torch.Tensor, new_tokens: int, eos: set[int] | None = None) -> tuple[torch.Tensor, Timing]:
    """Greedy generation of up to ``new_tokens`` tokens per sequence after ``ids`` (B, S): the
    first from the prefill, the rest from decode steps; stops early when every sequence has
    produced a token in ``eos``. Returns the new tokens (B, n) and the timing."""
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise LowbitError(f"the prompt must be (batch, length >= 1) token ids, got shape {tuple(ids.shape)}")
    if new_tokens < 1:
        raise LowbitError(f"new_tokens must be at least 1, got {new_tokens}")
    eos_t = torch.tensor(sorted(eos or ()), dtype=torch.int64)
    start = time.perf_counter()
    logits, past = step(ids, None)
    nxt = logits.argmax(dim=-1, keepdim=True)
    prefilled = time.perf_counter()
    tokens = [nxt]
    done = torch.isin(nxt[:, 0], eos_t)
    while len(tokens) < new_tokens and not bool(done.all()):
        logits, past = step(nxt, past)
        nxt = logits.argmax(dim=-1, keepdim=True)
        tokens.append(nxt)
        done |= torch.isin(nxt[:, 0], eos_t)
    end = time.perf_counter()
    timing = Timing(ids.shape[0], ids.shape[1], len(tokens) - 1, prefilled - start, end - prefilled)
    return torch.cat(tokens, dim=1), timing


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    timing: Timing

    @property
    def new_tokens(self) -> int:
        return self.timing.steps + 1


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = True) -> torch.Tensor:
    """(1, S) token ids of ``prompt``, through the tokenizer's chat template when it has one and
    ``chat`` is set (as a user turn, with the assistant's turn opened)."""
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc  # a BatchEncoding or the ids
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(1, -1)
    if ids.shape[1] == 0:
        raise LowbitError("the prompt is empty after tokenization; give some text with --prompt")
    return ids


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the model's generation config's."""
    found: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found


def generate_text(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64, chat: bool = True
) -> Generation:
    """Greedy reply to ``prompt`` (stopping at EOS), decoded to text, with its timing."""
    if tokenizer is None:
        raise LowbitError("this model has no tokenizer files; save the model with its tokenizer to run prompts")
    ids = prompt_ids(tokenizer, prompt, chat)
    new, timing = greedy(torch_step(model), ids, max_new_tokens, eos_ids(model, tokenizer))
    text = tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    return Generation(text, ids.shape[1], timing)
