"""Golden outputs: what every method writes, as one SHA-256 per tensor, so a change to the
runner can show it changed no number (or say which tensors moved and by how much).

``GOLDEN_RECIPES`` names every preset plus the methods that are recipe steps rather than presets
(OS+, ZeroQuant, SmoothQuant+, AWQ before GPTQ). ``bench/golden_presets.py`` records and checks
them on a real model; ``tests/test_golden.py`` on a tiny one. Digests are only comparable on
one machine type with the same thread count: summation order changes the last bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from lowbit.presets import PRESETS, get_preset
from lowbit.scheme import Recipe, Step

# recipe name -> (preset whose scheme it uses, its steps; () keeps the preset's own)
EXTRA_RECIPES: dict[str, tuple[str, tuple[Step, ...]]] = {
    "w8a8-osplus": ("w8a8-static", (Step("osplus"), Step("rtn"))),
    "w8a8-zeroquant": ("w8a8", (Step("zeroquant", {"steps": 4}),)),
    "w8a8-sqplus": ("w8a8-static", (Step("smoothquant_plus"), Step("rtn"))),
    "w4a16-awq-gptq": ("w4a16", (Step("awq"), Step("gptq"))),
}


# step parameters pinned in every golden recipe: learned rounding's "auto" precision is bf16 or
# fp32 depending on the CPU, which would make the digests depend on it
PINNED: dict[str, dict[str, str]] = {"adaround": {"precision": "fp32"}, "signround": {"precision": "fp32"}}


def _pinned(recipe: Recipe) -> Recipe:
    steps = tuple(Step(s.name, {**PINNED[s.name], **s.params}) if s.name in PINNED else s for s in recipe.steps)
    return dataclasses.replace(recipe, steps=steps)


def golden_recipes() -> dict[str, Recipe]:
    """Every preset, then ``EXTRA_RECIPES``, by name (``PINNED`` parameters set)."""
    out = {name: get_preset(name) for name in PRESETS}
    for name, (base, steps) in EXTRA_RECIPES.items():
        out[name] = dataclasses.replace(get_preset(base), steps=steps, name=name)
    return {name: _pinned(recipe) for name, recipe in out.items()}


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_digests(path: str | Path) -> dict[str, str]:
    """Tensor name -> digest over every ``*.safetensors`` file of a checkpoint directory."""
    out: dict[str, str] = {}
    for file in sorted(Path(path).glob("**/*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[key] = tensor_digest(f.get_tensor(key))
    return out


def compare(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """Lines describing each tensor that is missing, new or changed (empty: identical)."""
    lines = [f"missing: {k}" for k in sorted(set(recorded) - set(now))]
    lines += [f"new: {k}" for k in sorted(set(now) - set(recorded))]
    lines += [f"changed: {k}" for k in sorted(set(recorded) & set(now)) if recorded[k] != now[k]]
    return lines
