"""SmoothQuant+ on a tiny Llama with planted salient channels, W4 g32 weight-only: the model-level
alpha search (checked against a brute-force loop with its own scoring), its effect against RTN,
GPTQ after it, SmoothQuant's weight_only switch, memory and progress hygiene, parameter checks."""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import block_context, planted_llama, tiny_llama, token_ids
from torch import nn

from lowbit.algorithms import build_algorithm
from lowbit.algorithms import smoothquant as sq
from lowbit.errors import LowbitError
from lowbit.pipeline import RunOptions, RunReport, model_search, quantize_model
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 32, symmetric=True)
W4_ONLY = Scheme(weights=W4)
SALIENT = [3, 17, 40, 100]  # hidden channels
ALPHAS = (0.15, 0.35, 0.55, 0.75)
SEARCH_SAMPLES = 4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _planted_llama() -> nn.Module:
    """A tiny llama with a few salient input channels x20 at every smoothing pair: norm channels
    (entering q/k/v and gate/up), value channels (the attention output entering o_proj) and up_proj
    channels (entering down_proj), so weight-only rounding errors on those columns dominate."""
    model = planted_llama(SALIENT, 20)
    for layer in model.model.layers:
        layer.self_attn.v_proj.weight.data[[3, 17, 40, 60]] *= 20
        layer.mlp.up_proj.weight.data[[5, 77, 130, 200]] *= 20
    return model


def _calib() -> torch.Tensor:
    return token_ids(8, 32, seed=1)


def _recipe(params: dict[str, Any] | None = None, quantizer: str = "rtn") -> Recipe:
    return Recipe(W4_ONLY, (Step("smoothquant_plus", params or {"alphas": ALPHAS}), Step(quantizer)), "sq+")


@torch.no_grad()
def _mean_token_kl(reference: nn.Module, model: nn.Module, ids: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || model), written independently of lowbit's."""
    ref = reference(input_ids=ids).logits.log_softmax(-1)
    got = model(input_ids=ids).logits.log_softmax(-1)
    return float(F.kl_div(got, ref, log_target=True, reduction="sum")) / (ids.shape[0] * ids.shape[1])


@functools.cache
def _brute_force() -> dict[float, float]:
    """Each candidate alpha the slow way: a fresh planted model quantized with weight-only
    SmoothQuant(alpha) + RTN on the search sequences, scored on them against the float model."""
    search = _calib()[:SEARCH_SAMPLES]
    reference = _planted_llama()
    table = {}
    for alpha in ALPHAS:
        model = _planted_llama()
        steps = (Step("smoothquant", {"alpha": alpha, "pairs": "all", "weight_only": True}), Step("rtn"))
        quantize_model(model, Recipe(W4_ONLY, steps), search, batch_size=4, progress=False)
        table[alpha] = _mean_token_kl(reference, model, search)
    return table


@functools.cache
def _run(kind: str) -> tuple[RunReport, float]:
    """Quantize the planted model (``rtn`` or ``sq+gptq``); the report and
    KL(float || quantized) per sequence of the logits on held-out sequences."""
    recipe = {
        "rtn": Recipe(W4_ONLY, (Step("rtn"),), "rtn"),
        "sq+gptq": _recipe({"alphas": (0.35, 0.55)}, "gptq"),
    }[kind]
    ids = token_ids(4, 32, seed=7)
    with torch.no_grad():
        ref = _planted_llama()(input_ids=ids).logits.log_softmax(-1)
    model = _planted_llama()
    report = quantize_model(model, recipe, _calib(), batch_size=4, progress=False)
    with torch.no_grad():
        got = model(input_ids=ids).logits.log_softmax(-1)
    return report, float(F.kl_div(got, ref, log_target=True, reduction="batchmean"))


# --- the search -----------------------------------------------------------------------------------


def test_search_picks_the_alpha_with_the_lowest_output_loss(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search table equals the brute-force loop's; the chosen alpha is its minimum; the model
    is untouched and never copied, and the inner pipeline runs print no progress bars."""
    copies: list[weakref.ref[Any]] = []
    depth = [0]
    deepcopy = copy.deepcopy

    def spy(obj: Any, memo: Any = None, _nil: Any = None) -> Any:  # records top-level copies only
        depth[0] += 1
        try:
            out = deepcopy(obj, memo)
        finally:
            depth[0] -= 1
        if depth[0] == 0 and isinstance(out, nn.Module):
            copies.append(weakref.ref(out))
        return out

    monkeypatch.setattr(copy, "deepcopy", spy)
    model = _planted_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    algorithm = build_algorithm("smoothquant_plus", {"alphas": list(ALPHAS), "search_samples": SEARCH_SAMPLES})
    assert isinstance(algorithm, sq.SmoothQuantPlus)
    capsys.readouterr()
    model_search(model, algorithm, _recipe(), _calib(), RunOptions(batch_size=4, progress=False))
    monkeypatch.undo()
    assert capsys.readouterr().err == ""

    brute = _brute_force()
    assert [alpha for alpha, _ in algorithm.search_results] == list(ALPHAS)
    for alpha, kl in algorithm.search_results:
        assert kl == pytest.approx(brute[alpha], rel=1e-5), alpha
    best = min(brute, key=lambda a: brute[a])
    assert algorithm.alpha == best and algorithm.search_kl == pytest.approx(brute[best], rel=1e-5)
    assert len(set(brute.values())) == len(ALPHAS)  # the candidates really differ

    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert copies == []  # the candidates ran in place: the model was never copied


def _on_search_sequences(recipe: Recipe) -> tuple[RunReport, float]:
    """Quantize the planted model with ``recipe`` calibrated on the search sequences only, so the
    pipeline's smoothing statistics are the ones each search candidate saw; its report and mean
    per-token KL(float || quantized) on those sequences, scored as ``_brute_force`` scores."""
    search = _calib()[:SEARCH_SAMPLES]
    model = _planted_llama()
    report = quantize_model(model, recipe, search, batch_size=4, progress=False)
    return report, _mean_token_kl(_planted_llama(), model, search)


def _assert_smoothed_with_the_least_kl_alpha(report: RunReport, kl: float) -> None:
    """Every weight-only target was smoothed with the brute-force table's minimum, and the model
    the pipeline made is that candidate: its KL is the table's least, below its worst."""
    brute = _brute_force()
    best = min(brute, key=lambda a: brute[a])
    assert {layer.name.split(".", 3)[-1] for layer in report.layers} == set(LINEARS)
    for layer in report.layers:
        assert layer.extra["smooth_alpha"] == best, layer.name
        assert layer.extra["smooth_search_kl"] == pytest.approx(brute[best], rel=1e-5)
        assert layer.extra["smooth_max_scale"] > 1
    assert kl == pytest.approx(brute[best], rel=1e-5)
    assert kl <= min(brute.values()) * (1 + 1e-5) and kl < max(brute.values())


def test_pipeline_smooths_with_the_searched_alpha_whose_output_kl_is_the_least() -> None:
    """What the search guarantees, on the sequences it scores: the least KL over the candidates.
    (Held-out KL and summed block errors against RTN are not what it optimises: on a fresh machine
    the block errors were 0.0739 against RTN's 0.0757.) On this planted model, smoothing also beats
    no smoothing on the same sequences (measured: 0.0016 against RTN's 0.0024)."""
    report, kl = _on_search_sequences(_recipe())
    _assert_smoothed_with_the_least_kl_alpha(report, kl)
    _, rtn_kl = _on_search_sequences(Recipe(W4_ONLY, (Step("rtn"),), "rtn"))
    assert kl < rtn_kl, (kl, rtn_kl)


def _pick_the_worst(choose: Any) -> Any:
    def broken(self: sq.SmoothQuantPlus, *args: Any) -> None:
        choose(self, *args)
        self.alpha, self.search_kl = max(self.search_results, key=lambda r: r[1])

    return broken


@pytest.mark.parametrize("broken", ["picks the worst", "fixed alpha"])
def test_a_broken_search_fails_that_claim(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is not vacuous: a search that keeps the worst candidate, or no search (one
    fixed alpha), smooths with another alpha and quantizes to a model with a higher KL."""
    recipe = _recipe({"alphas": [max(ALPHAS)]}) if broken == "fixed alpha" else _recipe()
    if broken == "picks the worst":
        monkeypatch.setattr(sq.SmoothQuantPlus, "choose", _pick_the_worst(sq.SmoothQuantPlus.choose))
    report, kl = _on_search_sequences(recipe)
    with pytest.raises(AssertionError):
        _assert_smoothed_with_the_least_kl_alpha(report, kl)
    assert kl > min(_brute_force().values())


def test_gptq_after_smoothquant_plus() -> None:
    _, rtn_kl = _run("rtn")
    report, kl = _run("sq+gptq")
    assert all(layer.extra["smooth_alpha"] in (0.35, 0.55) for layer in report.layers)
    assert all("gptq_loss" in layer.extra for layer in report.layers)
    assert all(0 < e < float("inf") for e in report.block_errors)
    assert kl < rtn_kl, (kl, rtn_kl)


def test_default_candidates() -> None:
    algorithm = build_algorithm("smoothquant_plus", {})
    assert isinstance(algorithm, sq.SmoothQuantPlus)
    assert algorithm.alphas == pytest.approx([0.05 + 0.1 * i for i in range(10)])
    assert algorithm.alpha is None and algorithm.search_results == []


# --- SmoothQuant's weight_only switch -------------------------------------------------------------


def test_weight_only_smoothquant_smooths_weight_only_schemes_exactly() -> None:
    ctx = block_context(_planted_llama(), W4_ONLY, _calib())
    ref = ctx.forward()
    sq.SmoothQuant(alpha=0.5, weight_only=True).apply(ctx)
    assert set(ctx.stats) == set(LINEARS)
    assert all(s["smooth_alpha"] == 0.5 for s in ctx.stats.values())
    for got, want in zip(ctx.forward(), ref, strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-5


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"alphas": []}, "alphas must be a non-empty list"),
        ({"alphas": 0.5}, "alphas must be a non-empty list"),
        ({"alphas": "0.5"}, "alphas must be a non-empty list"),
        ({"alphas": [0.2, 1.5]}, r"every alpha .* got 1\.5"),
        ({"alphas": [True]}, "every alpha"),
        ({"pairs": "some"}, "pairs must be one of"),
        ({"search_samples": 0}, "search_samples"),
        ({"search_samples": 2.5}, "search_samples"),
        ({"alpha": 0.5}, "did you mean 'alphas'"),
    ],
)
def test_bad_parameters(params: dict[str, object], fragment: str) -> None:
    with pytest.raises(LowbitError, match=fragment):
        build_algorithm("smoothquant_plus", params)


def test_bad_smoothquant_weight_only() -> None:
    with pytest.raises(LowbitError, match="weight_only must be true or false"):
        build_algorithm("smoothquant", {"weight_only": "yes"})


def test_apply_before_the_search_and_two_steps_are_errors() -> None:
    algorithm = build_algorithm("smoothquant_plus", {"alphas": [0.5]})
    with pytest.raises(LowbitError, match="no alpha yet"):
        algorithm.apply(block_context(tiny_llama(), W4_ONLY, _calib()))
    twice = Recipe(W4_ONLY, (Step("smoothquant_plus"), Step("smoothquant_plus"), Step("rtn")))
    with pytest.raises(LowbitError, match="exactly one smoothquant_plus step, it has 2"):
        quantize_model(tiny_llama(), twice, _calib()[:2], batch_size=2, progress=False)
