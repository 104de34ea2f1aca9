"""The block runner's own guarantees: a data-free recipe makes no forward pass; a memory budget
moves activations to disk without changing a number; data-parallel workers give the
single-process result; devices are checked."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from tiny_models import N_LAYERS, tiny_llama, token_ids
from torch import nn

from lowbit import dist
from lowbit.activations import ActivationStore, Spill
from lowbit.errors import LowbitError
from lowbit.modules import QuantLinear
from lowbit.pipeline import RunOptions, quantize_model, resolve_device
from lowbit.presets import get_preset
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step


def _calib() -> torch.Tensor:
    return token_ids(8, 24, seed=3)


def _quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized model: float tensors and each QuantLinear's codes and scales."""
    out = {k: v for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.qweight is not None:
            out[f"{name}.codes"] = m.qweight.codes
            out[f"{name}.scale"] = m.qweight.scale
            out[f"{name}.zero_point"] = m.qweight.zero_point
        if isinstance(m, QuantLinear) and m.act is not None and m.act.scale is not None:
            out[f"{name}.input_scale"] = m.act.scale
    return out


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_data_free_recipe_makes_no_forward_pass() -> None:
    model = tiny_llama()
    calls = [0]

    def count(*_: Any) -> None:
        calls[0] += 1

    handles = [m.register_forward_pre_hook(count) for m in model.modules()]
    try:
        report = quantize_model(model, get_preset("w4a16-rtn"), _calib(), progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == 0 and report.forward_passes == 0
    assert report.block_errors == [] and all(r.error_on == "weights" for r in report.layers)
    assert all(0 < r.rel_error < 0.05 for r in report.layers)
    # the same weights as a run that measures on calibration data
    measured = tiny_llama()
    again = quantize_model(measured, get_preset("w4a16-rtn"), _calib(), progress=False, measure=True)
    assert again.forward_passes > 0 and len(again.block_errors) == N_LAYERS
    _assert_equal(_quantized_state(model), _quantized_state(measured))


def test_dynamic_activations_need_no_data_but_static_ones_do() -> None:
    from lowbit.algorithms import build_algorithm
    from lowbit.stages import needs_data

    rtn = [build_algorithm("rtn", {})]
    assert not needs_data(get_preset("w8a8-fp8"), rtn)  # dynamic per-token activations
    assert not needs_data(get_preset("w8a8-kv8"), rtn)  # dynamic per-token KV
    assert needs_data(_static_kv(), rtn)  # a static KV cache is observed
    assert needs_data(get_preset("llm-int8"), rtn)  # its report counts outliers on the quantized pass
    assert needs_data(get_preset("w4a16"), [build_algorithm("gptq", {})])


def _static_kv() -> Recipe:
    kv = QuantSpec("int8", "head", None, symmetric=True, observer="minmax")
    return Recipe(Scheme(weights=get_preset("w4a16").scheme.weights, kv_cache=kv), (Step("gptq"),), "w4-kv8-head")


def _recipe(name: str) -> Recipe:
    """A preset, or: ``kv-static`` GPTQ with a static per-head KV cache; ``NAME+rtn`` the preset's
    scheme and transforms with RTN instead of its quantizer."""
    if name == "kv-static":
        return _static_kv()
    if name.endswith("+rtn"):
        base = _recipe(name.removesuffix("+rtn"))
        steps = (*tuple(s for s in base.steps if s.name not in ("gptq", "owq")), Step("rtn"))
        return Recipe(base.scheme, steps, name)
    return get_preset(name)


@pytest.mark.parametrize("preset", ["w4a16", "w8a8-static", "kv-static"])
def test_a_memory_budget_spills_activations_and_changes_nothing(preset: str, tmp_path: Any) -> None:
    free, spilled = tiny_llama(), tiny_llama()
    base = quantize_model(free, _recipe(preset), _calib(), batch_size=2, progress=False)
    report = quantize_model(
        spilled, _recipe(preset), _calib(), batch_size=2, progress=False, max_memory=1, spill_dir=tmp_path
    )
    assert base.spilled_bytes == 0 and report.spilled_bytes > 0
    _assert_equal(_quantized_state(free), _quantized_state(spilled))
    assert report.block_errors == base.block_errors
    assert list(tmp_path.iterdir()) == []  # the spill files are gone


def _worker_run(preset: str, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    quantize_model(model, _recipe(preset), dist.split_samples(calib), batch_size=2, progress=False)
    return _quantized_state(model)


@pytest.mark.parametrize("preset", ["w8a8-static+rtn", "kv-static+rtn", "w4a16"])
def test_two_workers_give_the_single_process_result(preset: str) -> None:
    """Statistics that are min/max or sums are all-reduced: with RTN after them the checkpoint is
    the single-process one. GPTQ's Hessian is a sum too (equal to ~1e-7 in tests/test_dist.py),
    but a code that flips at a rounding boundary changes the updates of every later column, so
    only a small share of its codes may differ."""
    single = tiny_llama()
    quantize_model(single, _recipe(preset), _calib(), batch_size=2, progress=False)
    want = _quantized_state(single)
    got = dist.run_workers(2, _worker_run, preset, _calib())
    assert want.keys() == got.keys()
    quantized = {n for n, m in single.named_modules() if isinstance(m, QuantLinear)}
    for k in want:
        if preset == "w4a16" and (k.endswith(".codes") or (k.rsplit(".", 1)[0] in quantized and k.endswith(".weight"))):
            moved = (got[k] != want[k]).float().mean().item()
            assert moved < 2e-3, (k, moved)
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def _worker_refused(calib: torch.Tensor) -> None:
    recipe = Recipe(get_preset("w4a16").scheme, (Step("awq"), Step("rtn")), "awq")
    quantize_model(tiny_llama(), recipe, dist.split_samples(calib), progress=False)


def test_steps_that_search_on_their_own_share_are_refused_with_workers() -> None:
    with pytest.raises(LowbitError, match="awq search or train on their own calibration samples"):
        dist.run_workers(2, _worker_refused, _calib())


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LowbitError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="no CUDA device"):
            resolve_device("cuda")
    model = tiny_llama()
    before = copy.deepcopy(model)
    quantize_model(model, get_preset("w4a16"), _calib(), progress=False, device="cpu")
    quantize_model(before, get_preset("w4a16"), _calib(), progress=False)
    _assert_equal(_quantized_state(model), _quantized_state(before))
    assert RunOptions().device == "cpu"


def test_a_store_hands_its_batches_to_a_writer_on_the_host() -> None:
    """``store[i]`` is on the run's device; ``on_host`` gives the stored batches (in memory or
    spilled) as they are, so writing a boundary does not copy them through the GPU."""
    spill = Spill(max_bytes=4 * 8 * 4)  # room for one (2, 4, 4) float32 batch, the next spills
    try:
        batches = [torch.randn(2, 4, 4), torch.randn(2, 4, 4)]
        store = ActivationStore.of(batches, spill, device="meta")
        assert store.on_disk == 1
        assert store[0].device.type == "meta"
        host = store.on_host()
        assert [t.device.type for t in host] == ["cpu", "cpu"]
        for got, want in zip(host, batches, strict=True):
            assert torch.equal(got, want)
    finally:
        spill.close()
