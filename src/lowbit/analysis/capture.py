"""Observe-only capture: per-channel statistics of every decoder linear's input, from forward hooks
that are removed when the pass ends (``hooks.forward_hooks``); no weight changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.hooks import forward_hooks

__all__ = ["LinearStats", "block_linears", "capture_stats", "layer_index"]

_BLOCK = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    """The decoder block a linear's name lies in (``model.layers.3.mlp.up_proj`` -> 3)."""
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else -1


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks (the output head and other outer layers excluded)."""
    from lowbit.archs import get_arch

    prefix = get_arch(model).blocks + "."
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)}


@dataclass
class LinearStats:
    """What one linear's input looked like over ``n_tokens`` tokens (C input channels)."""

    absmax: torch.Tensor  # (C,) max |x| per channel
    big: torch.Tensor  # (C,) tokens with |x| >= threshold, per channel
    cmin: torch.Tensor  # (C,) per-channel minimum
    cmax: torch.Tensor  # (C,) per-channel maximum
    n_tokens: int
    sample: torch.Tensor  # (<= keep, C) the first input rows, float32, for error measurements


def _new(c: int) -> LinearStats:
    z = torch.zeros(c)
    return LinearStats(z.clone(), z.clone(), torch.full((c,), torch.inf), torch.full((c,), -torch.inf), 0, z[:0])


@torch.inference_mode()
def capture_stats(
    model: nn.Module,
    ids: torch.Tensor,
    batch_size: int = 4,
    keep_tokens: int = 256,
    threshold: float = 6.0,
    progress: bool = True,
    desc: str = "observe",
) -> dict[str, LinearStats]:
    """Run ``ids`` (n, T) through ``model`` in batches and return each block linear's input stats."""
    linears = block_linears(model)
    stats = {name: _new(m.in_features) for name, m in linears.items()}

    def hook_for(name: str):
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()
            s = stats[name]
            s.absmax = torch.maximum(s.absmax, x.abs().amax(0))
            s.big += (x.abs() >= threshold).sum(0)
            s.cmin = torch.minimum(s.cmin, x.amin(0))
            s.cmax = torch.maximum(s.cmax, x.amax(0))
            s.n_tokens += x.shape[0]
            if s.sample.shape[0] < keep_tokens:
                s.sample = torch.cat([s.sample, x[: keep_tokens - s.sample.shape[0]]])

        return hook

    model.eval()
    with forward_hooks({m: hook_for(n) for n, m in linears.items()}):
        for i in tqdm(range(0, ids.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
            model(input_ids=ids[i : i + batch_size], use_cache=False)
    return stats
