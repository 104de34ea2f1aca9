"""Quantize a synthetic llama larger than this machine's memory, streamed, and print the peak.

    python bench/big_model.py [--size-gb N] [--dir /path/with/room] [--keep]

Generates a llama (hidden 4096, intermediate 11008, 32 heads, random weights of std 0.02) with
as many layers as make ``--size-gb`` of float32 weights (default: 1.1x the machine's memory), one
safetensors shard per block, then runs ``lowbit quantize DIR --preset w4a16-rtn --no-eval`` in
a child process and prints the checkpoint's size, the child's peak resident memory and the time.
The generated model and the checkpoint are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, HEADS, VOCAB = 4096, 11008, 32, 32000


def memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("cannot read /proc/meminfo; give --size-gb")


def generate(root: Path, size: int) -> int:
    """Write the model; returns its weight bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    block = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)
    outer = 4 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = max(1, -(-(size - outer) // block))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config.save_pretrained(root)
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(root)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    write(
        "outer.safetensors",
        {
            "model.embed_tokens.weight": randn(VOCAB, HIDDEN),
            "lm_head.weight": randn(VOCAB, HIDDEN),
            "model.norm.weight": torch.ones(HIDDEN),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (HIDDEN, HIDDEN),
            "self_attn.k_proj": (HIDDEN, HIDDEN),
            "self_attn.v_proj": (HIDDEN, HIDDEN),
            "self_attn.o_proj": (HIDDEN, HIDDEN),
            "mlp.gate_proj": (INTER, HIDDEN),
            "mlp.up_proj": (INTER, HIDDEN),
            "mlp.down_proj": (HIDDEN, INTER),
        }
        tensors = {f"{p}{k}.weight": randn(*s) for k, s in shapes.items()}
        tensors[f"{p}input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(HIDDEN)
        write(f"block-{i:03d}.safetensors", tensors)
        print(f"\rgenerated block {i + 1}/{layers}", end="", flush=True)
    print()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in root.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=None)
    ap.add_argument("--dir", default=None, help="where to generate (default: the temp dir)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--observer", default="mse", help="weight range observer (the preset's: mse; minmax is fast)")
    args = ap.parse_args()
    size = int(args.size_gb * 2**30) if args.size_gb else int(1.1 * memory_bytes())
    root = Path(tempfile.mkdtemp(prefix="lowbit-big-", dir=args.dir))
    try:
        start = time.perf_counter()
        model_bytes = generate(root / "model", size) if (root / "model").mkdir() is None else 0
        print(
            f"model: {model_bytes / 2**30:.1f} GiB of float32 weights in {root / 'model'} "
            f"({time.perf_counter() - start:.0f} s to generate); machine memory {memory_bytes() / 2**30:.1f} GiB"
        )
        start = time.perf_counter()
        recipe = ["--preset", "w4a16-rtn"]
        if args.observer != "mse":  # the preset's clip search costs far more than reading and writing
            (root / "recipe.yaml").write_text(
                f"preset: w4a16-rtn\nname: w4a16-rtn-{args.observer}\nscheme:\n  weights:\n"
                f"    observer: {args.observer}\n    observer_args: {{}}\n"
            )
            recipe = ["--recipe", str(root / "recipe.yaml")]
        out = ["--no-eval", "--out", str(root / "ckpt"), "--quiet"]
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(root / "model"), *recipe, *out]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if proc.returncode != 0:
            raise SystemExit(f"quantize failed:\n{proc.stderr[-3000:]}")
        ckpt = sum(f.stat().st_size for f in (root / "ckpt").glob("*.safetensors"))
        print(proc.stdout.strip())
        print(
            f"\nw4a16-rtn ({args.observer} ranges) streamed: checkpoint {ckpt / 2**30:.2f} GiB "
            f"from {model_bytes / 2**30:.1f} GiB, "
            f"peak memory {peak / 2**30:.2f} GiB ({peak / model_bytes:.3f}x the model), {seconds:.0f} s"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
