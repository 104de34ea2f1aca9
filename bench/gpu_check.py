"""The same presets quantized on the CPU and on a CUDA device: do both give the same model?

    python bench/gpu_check.py [--presets all|w4a16-rtn,w4a16,...] [--iters 50] [--devices cpu,cuda]

A seeded random Llama (hidden 256, 2 layers; no download) is quantized with each preset (default:
every preset; ``CHECKED`` lists those that passed on an H200) twice,
blocks processed on the CPU and on ``cuda``, on the same random calibration tokens (the learned
rounding steps with ``--iters`` steps). Both results are evaluated on the CPU against the float
model on held-out random tokens: the relative error of their logits (``||q - f|| / ||f||``), and
the relative difference between the two quantized models' logits. Deterministic methods should
agree to rounding (a GPTQ code may flip where float sums differ); the learned ones to their
noise, with errors of the same size on both devices. Prints a table; needs a CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import api
from lowbit.eval import format_table
from lowbit.presets import PRESETS, get_preset
from lowbit.scheme import Step

CHECKED = "w4a16-rtn,w4a16,w4a16-awq,w4a16-owq,w4a16-ar,w4a16-signround,w4a8-ar,w8a8,w8a8-fp8,w3a16-bcq"
LEARNED = ("adaround", "signround")


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=512,
        max_position_embeddings=256,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float().eval()


def with_iters(name: str, iters: int) -> api.Recipe:
    recipe = get_preset(name)
    steps = tuple(Step(s.name, {**s.params, "iters": iters}) if s.name in LEARNED else s for s in recipe.steps)
    return dataclasses.replace(recipe, steps=steps)


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits.float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="all", help=f"comma-separated, or all (checked on a GPU so far: {CHECKED})")
    ap.add_argument("--iters", type=int, default=50, help="steps of the learned-rounding presets")
    ap.add_argument("--devices", default="cpu,cuda", help="the two devices compared (cpu,cpu checks this script)")
    args = ap.parse_args()
    devices = args.devices.split(",")
    if len(devices) != 2:
        ap.error("--devices takes two devices, e.g. cpu,cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 1
    original = tiny_llama()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 512, (16, 128), generator=g)
    held_out = torch.randint(0, 512, (4, 128), generator=g)
    ref = logits(original, held_out)
    rows: list[dict[str, object]] = []
    failed = 0
    names = sorted(PRESETS) if args.presets == "all" else args.presets.split(",")
    for name in names:
        recipe = with_iters(name, args.iters)
        row: dict[str, object] = {"preset": name, "method": "+".join(s.name for s in recipe.steps)}
        results = {}
        for i, device in enumerate(devices):
            model = copy.deepcopy(original)
            start = time.perf_counter()
            try:
                api.quantize(model, recipe, calib, progress=False, device=device)
            except Exception as exc:  # a device check reports every preset, failing or not
                row[f"error{i}"] = f"{type(exc).__name__}: {exc}"[:160]
                traceback.print_exc()
                failed += 1
                continue
            row[f"s{i}"] = time.perf_counter() - start
            results[i] = logits(model.to("cpu"), held_out)
            row[f"err{i}"] = float((results[i] - ref).norm() / ref.norm())
        if len(results) == 2:
            row["diff"] = float((results[0] - results[1]).norm() / ref.norm())
        rows.append(row)
        print(row, flush=True)
    columns = [
        ("preset", "preset"),
        ("method", "method"),
        ("err0", f"error {devices[0]}", ".4f"),
        ("err1", f"error {devices[1]}", ".4f"),
        ("diff", f"{devices[0]} vs {devices[1]}", ".2e"),
        ("s0", f"{devices[0]} s", ".1f"),
        ("s1", f"{devices[1]} s", ".1f"),
    ]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\n{gpu}, torch {torch.__version__}")
    print(format_table([{k: r.get(k) for k, *_ in columns} for r in rows], columns))  # type: ignore[arg-type]
    for r in rows:
        for i, device in enumerate(devices):
            if f"error{i}" in r:
                print(f"{r['preset']} on {device}: {r[f'error{i}']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
