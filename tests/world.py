"""A tiny, offline "user's machine" for command-line tests: a saved 2-layer Llama with a
word-level tokenizer, a text file, and a quantized lowbit checkpoint of it.

``build_world(root)`` makes one from nothing (seconds); tests copy a module-level template with
``copy_world`` so each test gets its own files to damage.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(300)]
CALIB_ARGS = ["--samples", "4", "--seq-len", "32"]
EVAL_ARGS = ["--eval-windows", "4", "--eval-seq-len", "32"]


@dataclass(frozen=True)
class World:
    root: Path  # everything below lives here
    model: Path  # float model directory (save_pretrained + tokenizer)
    text: Path  # ~3000 words, one token each
    ckpt: Path  # a w8a16 RTN lowbit checkpoint of ``model``


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``lowbit.cli.main(argv)`` with stdout and stderr captured."""
    from lowbit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def build_world(root: Path) -> World:
    tok = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = root / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    tok.save_pretrained(model)
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(15)) for _ in range(200)) + "\n")
    ckpt = root / "ckpt"
    argv = ["quantize", str(model), "--preset", "w8a16", "--method", "rtn", "--calib", str(text), *CALIB_ARGS]
    rc, _, err = run_cli([*argv, "--no-eval", "--out", str(ckpt), "--quiet"])
    assert rc == 0, err
    return World(root, model, text, ckpt)


def copy_world(template: World, root: Path) -> World:
    shutil.copytree(template.root, root, symlinks=True)
    return World(root, *(root / p.relative_to(template.root) for p in (template.model, template.text, template.ckpt)))
