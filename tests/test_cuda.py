"""Blocks processed on a CUDA device give the model the CPU gives (skipped without a GPU).

Until stop 25 no preset that collects a Hessian (GPTQ, OWQ, the -ar presets) nor one that
quantizes activations to FP8 ran on CUDA at all: buffers allocated on the CPU met activations on
the GPU. ``bench/gpu_check.py`` prints the same comparison as a table; on an H200 (torch 2.11)
every preset below ran, RTN and BCQ equal to the CPU's bit for bit, the rest within 4% in error.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_llama, token_ids

from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset
from lowbit.scheme import Step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

EXACT = ("w4a16-rtn", "w3a16-bcq")
CLOSE = ("w4a16", "w4a16-awq", "w4a16-owq", "w4a16-ar", "w4a16-signround", "w4a8-ar", "w8a8", "w8a8-fp8")


def _error(name: str, device: str) -> tuple[float, torch.Tensor]:
    recipe = get_preset(name)
    learned = ("adaround", "signround")
    steps = tuple(Step(s.name, {**s.params, "iters": 20}) if s.name in learned else s for s in recipe.steps)
    model, original = tiny_llama(), tiny_llama()
    quantize_model(model, dataclasses.replace(recipe, steps=steps), token_ids(8, 64), progress=False, device=device)
    held_out = token_ids(2, 64, seed=5)
    with torch.no_grad():
        ref = original(held_out).logits
        out = model.to("cpu")(held_out).logits
    return float((out - ref).norm() / ref.norm()), out


@pytest.mark.parametrize("name", EXACT + CLOSE)
def test_a_preset_on_cuda_matches_the_cpu(name: str) -> None:
    cpu_error, cpu_out = _error(name, "cpu")
    cuda_error, cuda_out = _error(name, "cuda")
    if name in EXACT:
        assert torch.equal(cpu_out, cuda_out)
    else:
        assert cuda_error == pytest.approx(cpu_error, rel=0.1)
