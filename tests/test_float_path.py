"""The float model's path (reconstruct steps with ``teacher="model"``): the runner carries the float
model's hidden states beside the quantized ones; the step's teacher is the float model's output at
its block (not the float block's output on the quantized inputs), its ``ctx.float_inputs`` the float
model's input there; a run without such a step carries nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from tiny_models import N_LAYERS, tiny_llama, token_ids

from lowbit.algorithms import build_algorithm
from lowbit.algorithms.adaround import AdaRound
from lowbit.algorithms.signround import SignRound
from lowbit.errors import LowbitError
from lowbit.pipeline import quantize_model
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 32, symmetric=True)
CALIB = token_ids(8, 24, seed=3)


def _seen(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[dict[str, Any]]:
    """From now on, what each ``cls.apply`` call is given: the teacher and float inputs per batch."""
    seen: list[dict[str, Any]] = []
    apply = cls.apply

    def spy(self: Any, ctx: Any) -> None:
        copies = lambda xs: None if xs is None else [t.clone() for t in xs]  # noqa: E731
        seen.append({"index": ctx.index, "teacher": copies(ctx.teacher), "float_inputs": copies(ctx.float_inputs)})
        apply(self, ctx)

    monkeypatch.setattr(cls, "apply", spy)
    return seen


def _float_hidden_states(model: torch.nn.Module) -> list[torch.Tensor]:
    """The float model's hidden states entering each block and after each but the last, per
    calibration batch of 4, concatenated over batches: ``[inputs of block 0, outputs of 0, ...]``."""
    with torch.no_grad():
        outs = [model(input_ids=CALIB[i : i + 4], output_hidden_states=True).hidden_states for i in (0, 4)]
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


@pytest.mark.parametrize("step", ["adaround", "signround"])
def test_teacher_model_is_the_float_models_hidden_states(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    model = tiny_llama()
    states = _float_hidden_states(copy.deepcopy(model))
    seen = _seen(monkeypatch, AdaRound if step == "adaround" else SignRound)
    recipe = Recipe(Scheme(weights=W4), (Step("rtn"), Step(step, {"iters": 2, "teacher": "model"})), "x")
    quantize_model(model, recipe, CALIB, batch_size=4, progress=False)
    assert [s["index"] for s in seen] == list(range(N_LAYERS))
    for s in seen:
        i = s["index"]
        torch.testing.assert_close(torch.cat(s["float_inputs"]), states[i], rtol=1e-5, atol=1e-6)
        if i + 1 < N_LAYERS:  # the last hidden state the model returns has the final norm applied
            torch.testing.assert_close(torch.cat(s["teacher"]), states[i + 1], rtol=1e-5, atol=1e-6)


def test_teacher_block_is_the_float_block_on_the_quantized_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default: block 0 has the float model's inputs (the teachers agree there), later blocks
    the quantized model's, so their teacher differs from the float model's path."""
    runs = {}
    for teacher in ("block", "model"):
        seen = _seen(monkeypatch, AdaRound)
        recipe = Recipe(Scheme(weights=W4), (Step("rtn"), Step("adaround", {"iters": 2, "teacher": teacher})), "x")
        quantize_model(tiny_llama(), recipe, CALIB, batch_size=4, progress=False)
        runs[teacher] = seen
        monkeypatch.undo()
    assert all(s["float_inputs"] is None for s in runs["block"])
    first_block, first_model = runs["block"][0]["teacher"], runs["model"][0]["teacher"]
    assert all(torch.equal(a, b) for a, b in zip(first_block, first_model, strict=True))
    later_block, later_model = torch.cat(runs["block"][1]["teacher"]), torch.cat(runs["model"][1]["teacher"])
    assert not torch.allclose(later_block, later_model)


def test_teacher_model_lowers_the_error_against_the_float_model() -> None:
    """Where a block can correct what the blocks before it left, the float model's target reaches
    lower output error than the float block's: the tiny llama, 3-bit, GPTQ start, 200 steps."""
    base = tiny_llama()
    ids = token_ids(4, 24, seed=9)
    with torch.no_grad():
        ref = base(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for teacher in ("block", "model"):
        model = copy.deepcopy(base)
        steps = (
            Step("gptq", {"act_order": True, "static_groups": True}),
            Step("adaround", {"iters": 200, "teacher": teacher, "precision": "fp32"}),
        )
        w3 = QuantSpec("int3", "group", 32, symmetric=True)
        quantize_model(model, Recipe(Scheme(weights=w3), steps, "x"), token_ids(16, 24, seed=3), progress=False)
        with torch.no_grad():
            got = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        errors[teacher] = float((got - ref).pow(2).sum() / ref.pow(2).sum())
    assert errors["model"] < errors["block"], errors


def test_bad_teacher_is_refused() -> None:
    for step in ("adaround", "signround"):
        with pytest.raises(LowbitError, match="teacher"):
            build_algorithm(step, {"teacher": "float"})
    for step in ("adaround", "signround"):  # the float model's target is the default
        assert build_algorithm(step, {}).float_path()
        assert not build_algorithm(step, {"teacher": "block"}).float_path()


def _block_outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each block's output on the calibration batches of 4, concatenated over batches."""
    outs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [
        block.register_forward_hook(lambda _m, _a, out, i=i: outs[i].append(out[0] if isinstance(out, tuple) else out))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for i in (0, 4):
                model(input_ids=CALIB[i : i + 4])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in outs]


def test_report_measures_each_block_against_the_float_model_when_the_run_carries_its_path() -> None:
    """``RunReport.model_errors``: the quantized model's output of each block against the float
    model's, on the calibration set (checked here against both models run whole); block 0 sees the
    float inputs, so there it is the block error; a run without the float path has none."""
    base = tiny_llama()
    float_outs = _block_outputs(base)
    model = copy.deepcopy(base)
    recipe = Recipe(Scheme(weights=W4), (Step("rtn"), Step("adaround", {"iters": 2, "teacher": "model"})), "x")
    report = quantize_model(model, recipe, CALIB, batch_size=4, progress=False)
    quantized = _block_outputs(model)
    assert len(report.model_errors) == len(report.block_errors) == N_LAYERS >= 2
    for i, (q, f) in enumerate(zip(quantized, float_outs, strict=True)):
        want = float((q - f).pow(2).sum() / f.pow(2).sum())
        assert report.model_errors[i] == pytest.approx(want, rel=1e-4), i
    assert report.model_errors[0] == pytest.approx(report.block_errors[0], rel=1e-6)
    assert report.model_errors[-1] > 1.5 * report.block_errors[-1]  # the earlier blocks' error carried on
    assert report.to_dict()["model_errors"] == report.model_errors
    block = Recipe(Scheme(weights=W4), (Step("rtn"), Step("adaround", {"iters": 2, "teacher": "block"})), "x")
    assert quantize_model(tiny_llama(), block, CALIB, batch_size=4, progress=False).model_errors == []
