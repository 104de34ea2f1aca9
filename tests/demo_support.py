"""The real demo model for the integration tests: loaded once per test file, with its logits on
the evaluation windows computed once (every run of a file is scored against the same fp32 model
on the same windows, so only the quantized model's forward passes are repeated)."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lowbit import api
from lowbit.presets import get_preset
from lowbit.scheme import Recipe, with_group_size


class CachedLogits(nn.Module):
    """``model`` as a baseline for ``api.evaluate`` whose logits are computed once per batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cache: dict[bytes, torch.Tensor] = {}

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        key = input_ids.cpu().numpy().tobytes() + str(tuple(input_ids.shape)).encode()
        if key not in self.cache:
            self.cache[key] = self.model(input_ids=input_ids, **kwargs).logits
        return SimpleNamespace(logits=self.cache[key])


def demo_setup() -> dict[str, Any]:
    torch.manual_seed(0)
    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=4, seq_len=256, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=512, n_windows=8)
    return {"model": model, "tok": tok, "calib": calib, "windows": windows, "baseline": CachedLogits(model)}


def run(
    demo: dict[str, Any], preset: str | Recipe, calib: torch.Tensor | None = None
) -> tuple[api.EvalResult, nn.Module]:
    """Quantize a copy of the demo model and evaluate it against the fp32 model."""
    model = copy.deepcopy(demo["model"])
    api.quantize(model, preset, demo["calib"] if calib is None else calib, batch_size=4, progress=False)
    res = api.evaluate(model, demo["windows"], baseline=demo["baseline"], batch_size=4, progress=False)
    return res, model


def g64(preset: str, method: str | None = None) -> Recipe:
    """A group-128 preset in groups of 64 (lowbit refuses groups that do not divide 576), with ``method``."""
    recipe = with_group_size(get_preset(preset), 64)
    return api.with_method(recipe, method) if method else recipe
