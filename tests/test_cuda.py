"""Blocks processed on a CUDA device give the model the CPU gives (skipped without a GPU).

Until stop 25 no preset that collects a Hessian (GPTQ, OWQ, the -ar presets) nor one that
quantizes activations to FP8 ran on CUDA at all: buffers allocated on the CPU met activations on
the GPU. ``bench/gpu_check.py`` prints the same comparison as a table; on an H200 (torch 2.11)
it ran every preset below, RTN and BCQ equal to the CPU's bit for bit, the rest within 4% in
error. This file itself has not yet run under pytest on a GPU: ``bench/gpu_session.sh`` runs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama, token_ids
from world import build_world

from lowbit import api, qat
from lowbit.algorithms.reconstruction import MiniBatches, device_room
from lowbit.golden import checkpoint_digests
from lowbit.job import Job, run_job
from lowbit.modules import QuantLinear
from lowbit.pipeline import RunOptions, quantize_model
from lowbit.presets import get_preset
from lowbit.qweight import TENSOR_FIELDS
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

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


def test_reconstruct_steps_keep_their_batches_on_the_gpu() -> None:
    """The stores hold calibration batches on the host; a reconstruct step on the GPU keeps the
    ones it read there (each read was a copy the device waited for), and its losses are those of
    the same batches read from the host."""
    torch.manual_seed(0)
    block = torch.nn.Linear(8, 8).cuda()
    hidden = [torch.randn(4, 5, 8) for _ in range(3)]
    with torch.no_grad():
        teacher = [(block(h.cuda()) * 1.1).cpu() for h in hidden]

    def batches(inputs: list[torch.Tensor]) -> MiniBatches:
        ctx = SimpleNamespace(inputs=[(h, {}) for h in inputs], teacher=teacher, block=block)
        return MiniBatches(ctx, 4, None, 0, "fp32")  # type: ignore[arg-type]

    held = batches([h.cuda() for h in hidden])
    assert device_room(torch.device("cuda")) > 0
    losses = [held.value(held.backward([u])) for u in range(3)]
    assert sorted(held._held) == [0, 1, 2]
    assert all(t.device.type == "cuda" for _, _, t in held._held.values())
    assert held._batch(1)[2] is held._held[1][2]  # read once
    block.zero_grad()
    plain = batches([h.cuda() for h in hidden])
    plain._room = 0  # nothing kept: every read copies from the host
    again = [plain.value(plain.backward([u])) for u in range(3)]
    assert not plain._held and again == pytest.approx(losses, rel=1e-6)
    assert held.loss([0, 1, 2]) == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_qat_trains_on_cuda_like_on_the_cpu(tmp_path: Path) -> None:
    """``lowbit qat --device cuda``: the same losses as on the CPU to float rounding, a checkpoint
    that loads on the host, a resumed run equal to an uninterrupted one on the device, and the float
    model passed in left on the host (also by an interrupted run)."""
    weights, acts = QuantSpec("uint4", "group", 32, False), QuantSpec("int8", "tensor", None, True)
    w4a8 = Recipe(Scheme(weights=weights, input_activations=acts), name="w4a8-static")
    config = qat.QATConfig(steps=6, lr=3e-2, batch_size=2, seq_len=32, save_every=2, lsq=True)
    data = token_ids(1, 8 * 32, seed=3).reshape(-1)

    def train(out: Path, device: str, model: torch.nn.Module | None = None, **kw: object) -> qat.QATResult:
        model = tiny_llama() if model is None else model
        return qat.train(
            model, w4a8, data, out, config, tokenizer=byte_tokenizer(), progress=False, device=device, **kw
        )  # type: ignore[arg-type]

    cpu = train(tmp_path / "cpu", "cpu")
    teacher = tiny_llama()
    cuda = train(tmp_path / "cuda", "cuda", teacher)
    assert all(p.device.type == "cpu" for p in teacher.parameters())  # the float model passed in stays
    assert cuda.losses == pytest.approx(cpu.losses, rel=1e-3)
    model, _, _ = api.load_quantized(cuda.out)
    assert all(p.device.type == "cpu" for p in model.parameters())

    def stop(step: int, _loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", "cuda", teacher, on_step=stop)
    assert all(p.device.type == "cpu" for p in teacher.parameters())  # also when interrupted
    resumed = train(tmp_path / "cut", "cuda", resume=True)
    assert resumed.start_step == 4 and resumed.losses == cuda.losses
