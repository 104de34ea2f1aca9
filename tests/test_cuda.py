"""Blocks processed on a CUDA device give the model the CPU gives (skipped without a GPU).

Until stop 25 no preset that collects a Hessian (GPTQ, OWQ, the -ar presets) nor one that
quantizes activations to FP8 ran on CUDA at all: buffers allocated on the CPU met activations on
the GPU. ``bench/gpu_check.py`` prints the same comparison as a table; on an H200 (torch 2.11)
every preset below ran, RTN and BCQ equal to the CPU's bit for bit, the rest within 4% in error.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, token_ids
from world import build_world

from lowbit.golden import checkpoint_digests
from lowbit.job import Job, run_job
from lowbit.modules import QuantLinear
from lowbit.pipeline import RunOptions, quantize_model
from lowbit.presets import get_preset
from lowbit.qweight import TENSOR_FIELDS
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


def test_finished_layers_go_back_to_the_host() -> None:
    """``Module.to`` moves buffers only: the codes and scales (plain attributes) follow the block
    back to the CPU by ``pipeline._to_host``."""
    model = tiny_llama()
    quantize_model(model, get_preset("w4a16"), token_ids(8, 64), progress=False, device="cuda")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers
    for m in layers:
        assert m.qweight is not None and m.weight.device.type == "cpu"
        for f in TENSOR_FIELDS:
            t = getattr(m.qweight, f)
            assert t is None or t.device.type == "cpu", f


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w4a16", "w3a16-bcq"])
def test_a_streamed_job_on_cuda_writes_a_checkpoint(tmp_path: Path, recipe: str) -> None:
    """Writing compares the group index with the default layout: with GPTQ's made on the GPU it
    raised before the layers were moved to the host. RTN's checkpoint is the CPU's, byte for byte."""
    world = build_world(tmp_path / "world")
    digests = {}
    for device in ("cpu", "cuda"):
        options = RunOptions(batch_size=2, progress=False, device=device)
        job = Job(str(world.model), get_preset(recipe), tmp_path / device, str(world.text), 6, 32, options=options)
        run_job(job)
        digests[device] = checkpoint_digests(tmp_path / device)
    if recipe == "w4a16-rtn":
        assert digests["cpu"] == digests["cuda"]
