"""Checks before work: the model skeleton, recipe checks against it, disk room, text sources, and
the numerics that must not stop a run (a layer that sees no input, a calibration text too short)."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama, token_ids
from world import CALIB_ARGS, World, build_world, copy_world, run_cli

import lowbit.api
import lowbit.models
from lowbit import api, preflight
from lowbit.checkpoint import weight_files
from lowbit.data import LowbitWarning, calibration_samples, check_source
from lowbit.errors import LowbitError
from lowbit.modules import QuantLinear
from lowbit.presets import get_preset
from lowbit.scheme import Override, QuantSpec, Recipe, Scheme, Step

W4 = QuantSpec("int4", "group", 64)


@pytest.fixture(autouse=True)
def _no_demo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))

    def refuse() -> Path:
        raise AssertionError("a preflight test tried to fetch the demo model")

    monkeypatch.setattr(lowbit.models, "fetch_demo_model", refuse)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("template"))


@pytest.fixture
def world(template: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = copy_world(template, tmp_path / "world")
    monkeypatch.chdir(w.root)
    yield w


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model (weights) is the work preflight must come before."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(lowbit.api, "load_model", refuse)


# --- the skeleton ----------------------------------------------------------------------------------


def test_skeleton_has_the_real_models_layers_on_meta(world: World) -> None:
    skel = preflight.skeleton(str(world.model))
    real, _ = api.load_model(str(world.model))
    shapes = {n: tuple(m.weight.shape) for n, m in preflight.linear_layers(skel).items()}
    assert shapes == {n: tuple(m.weight.shape) for n, m in preflight.linear_layers(real).items()}
    assert all(p.device.type == "meta" for p in skel.parameters())


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("./no-such-model", "does not exist"),
        ("missing.gguf", "GGUF file 'missing.gguf' does not exist"),
        ("text.txt", "is a file but not a .gguf file"),
    ],
)
def test_skeleton_of_a_missing_model(world: World, spec: str, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        preflight.skeleton(spec)


def test_skeleton_of_a_directory_without_config(world: World) -> None:
    (world.root / "empty").mkdir()
    with pytest.raises(LowbitError, match=r"has no config\.json"):
        preflight.skeleton("empty")


# --- recipe checks ---------------------------------------------------------------------------------


def _recipe(**scheme: Any) -> Recipe:
    return Recipe(Scheme(**{"weights": W4, **scheme}))


def test_group_size_that_does_not_divide_names_widths_and_suggests() -> None:
    model = tiny_llama()  # widths 128 (q/k/v/o/gate/up) and 256 (down)
    with pytest.raises(LowbitError) as err:
        preflight.check_recipe(_recipe(weights=QuantSpec("int4", "group", 96)), model)
    msg = str(err.value)
    assert "groups of 96 do not divide the 128 input columns of 12 layer(s)" in msg
    assert "the 256 input columns of 2 layer(s) (e.g. model.layers.0.mlp.down_proj)" in msg
    assert "groups of 64 or 32 divide every targeted width" in msg


def test_group_size_larger_than_a_layer() -> None:
    with pytest.raises(LowbitError, match="groups of 256 are larger than the 128 input columns of 12 layer"):
        preflight.check_recipe(_recipe(weights=QuantSpec("int4", "group", 256)), tiny_llama())


def test_group_size_of_an_override_is_checked_and_ignored_layers_are_not() -> None:
    model = tiny_llama()
    # down_proj (256 wide) in groups of 256 is fine, and so are groups of 256 on 128-wide layers left in float
    ok = Override("mlp.down_proj", QuantSpec("int4", "group", 256), None)
    preflight.check_recipe(_recipe(overrides=(ok,)), model)
    floats = Override("re:.*(self_attn|gate_proj|up_proj).*", None, None)
    preflight.check_recipe(_recipe(weights=QuantSpec("int4", "group", 256), overrides=(floats,)), model)
    bad = Override("re:.*o_proj", QuantSpec("int4", "group", 48), None)
    with pytest.raises(LowbitError, match="groups of 48 do not divide the 128 input columns of 2 layer"):
        preflight.check_recipe(_recipe(overrides=(bad,)), model)


@pytest.mark.parametrize(
    ("scheme", "match"),
    [
        ({"targets": ("q_projj",)}, "scheme.targets: 'q_projj' matches no linear layer"),
        ({"ignore": ("lm_head", "re:.*gate")}, "scheme.ignore: 're:.*gate' matches no linear layer"),
        ({"overrides": (Override("mlp.down", None, None),)}, "scheme.overrides: 'mlp.down' matches no linear"),
        ({"targets": ("lm_head",), "ignore": ()}, "the recipe quantizes no linear layer inside the decoder blocks"),
    ],
)
def test_patterns_must_match_a_layer(scheme: dict[str, Any], match: str) -> None:
    with pytest.raises(LowbitError) as err:
        preflight.check_recipe(_recipe(**scheme), tiny_llama())
    assert match in str(err.value)
    assert "self_attn.q_proj" in str(err.value) or "decoder blocks" in str(err.value)


def test_presets_pass_on_a_model_whose_widths_they_divide() -> None:
    model = tiny_llama()
    for name in ("w4a16", "w8a8", "w4a16-owq", "mxfp4", "kv8"):
        preflight.check_recipe(get_preset(name), model)


def test_api_quantize_refuses_before_any_calibration_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("calibration ran")

    monkeypatch.setattr(lowbit.api, "quantize_model", refuse)
    with pytest.raises(LowbitError, match="groups of 96"):
        api.quantize(model, _recipe(weights=QuantSpec("int4", "group", 96)), token_ids(2, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- the output's size and the disk ----------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w8a8", "w4a16-asym", "w4a16-owq"])
def test_estimate_is_close_to_the_real_file(tmp_path: Path, recipe: str) -> None:
    model = tiny_llama()
    skeleton_estimate = preflight.estimate_output_bytes(get_preset(recipe), model)
    report = api.quantize(model, get_preset(recipe), token_ids(2, 16), progress=False)
    api.save_quantized(model, byte_tokenizer(), tmp_path / "out", report)
    size = sum(f.stat().st_size for f in weight_files(tmp_path / "out"))
    assert 0.9 < skeleton_estimate / size < 1.1, (skeleton_estimate, size)


def test_check_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preflight.check_disk(tmp_path / "a" / "b", 10**6)  # a missing parent is fine: its ancestor is measured

    class Usage:
        free = 50 * 2**20

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(LowbitError, match=r"not enough disk space .* needs about 111 MiB .* 50 MiB free"):
        preflight.check_disk(tmp_path / "out", 100 * 2**20)


# --- text sources, before the model ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--calib", "no-such.txt"], "text source 'no-such.txt' does not exist"),
        (["--eval-data", "./none.jsonl"], "text source './none.jsonl' does not exist"),
        (["--preset", "w4a16-g32", "--recipe", "r.yaml"], "recipe file r.yaml does not exist"),
    ],
)
def test_bad_inputs_are_found_before_the_model_loads(world: World, no_load: None, argv: list[str], match: str) -> None:
    rc, _, err = run_cli(["quantize", str(world.model), "--calib", str(world.text), *CALIB_ARGS, *argv])
    assert rc == 2 and match in err, err


def test_recipe_that_does_not_fit_is_found_before_the_model_loads(world: World, no_load: None) -> None:
    (world.root / "r.yaml").write_text("scheme:\n  weights: {format: int4, granularity: group, group_size: 96}\n")
    rc, _, err = run_cli(["quantize", str(world.model), "--calib", str(world.text), "--recipe", "r.yaml", "--no-eval"])
    assert rc == 2 and "groups of 64 or 32 divide every targeted width" in err, err


@pytest.mark.parametrize(
    ("make", "source", "match"),
    [
        (None, "nothing/here.txt", "does not exist"),
        ({"e.txt": ""}, "e.txt", "is an empty file"),
        ({"a.csv": "x"}, "a.csv", "unsupported text file"),
        ({"d/a.md": "x"}, "d", "contains no *.txt files"),
        (None, "wikitext:", "cannot parse datasets name"),
    ],
)
def test_check_source_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: dict[str, str] | None, source: str, match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    for rel, text in (make or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    with pytest.raises(LowbitError, match=re.escape(match)):
        check_source(source)


def test_check_source_accepts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    for source in ("demo", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path)):
        check_source(source)


# --- calibration windows -----------------------------------------------------------------------------


def test_too_few_distinct_windows_warns_with_the_count(tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("x" * 37)  # one token per byte
    with pytest.warns(LowbitWarning, match="holds 37 tokens: only 6 distinct windows of 32 tokens; 16 were requested"):
        samples = calibration_samples(byte_tokenizer(), str(text), n_samples=16, seq_len=32)
    assert samples.shape == (16, 32)


def test_enough_distinct_windows_do_not_warn_and_draws_are_unchanged(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(97 + i % 26) for i in range(47)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowbitWarning)
        samples = calibration_samples(byte_tokenizer(), str(text), n_samples=16, seq_len=32, seed=3)
    stream = byte_tokenizer()(text.read_text(), add_special_tokens=False)["input_ids"]
    starts = torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(3))
    assert samples.tolist() == [stream[s : s + 32] for s in starts.tolist()]


# --- a layer that sees no input ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "owq"])
def test_zero_hessian_falls_back_to_rtn(method: str) -> None:
    model = tiny_llama()
    model.model.layers[0].input_layernorm.weight.data.zero_()  # q/k/v see zeros, and so o_proj
    rtn_model = copy.deepcopy(model)
    scheme = Scheme(weights=W4)
    calib = token_ids(4, 16)
    report = api.quantize(model, Recipe(scheme, (Step(method),)), calib, progress=False)
    api.quantize(rtn_model, Recipe(scheme, (Step("rtn"),)), calib, progress=False)
    zero = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    for name in zero:
        got, want = model.get_submodule(name), rtn_model.get_submodule(name)
        assert isinstance(got, QuantLinear) and isinstance(want, QuantLinear)
        assert got.qweight is not None and want.qweight is not None
        assert torch.equal(got.qweight.codes, want.qweight.codes) and torch.equal(got.qweight.scale, want.qweight.scale)
    entries = {r.name: r for r in report.layers}
    assert [n for n, r in entries.items() if r.fallback] == zero
    assert entries[zero[0]].fallback == "rtn (Hessian is all zero: the layer saw no input)"
    assert "fallback_rtn_zero_hessian" not in entries[zero[0]].extra
    assert report.warnings == [f"{n}: fallback: rtn (Hessian is all zero: the layer saw no input)" for n in zero]
    assert report.to_dict()["warnings"] == report.warnings
    assert (
        entries["model.layers.0.mlp.gate_proj"].fallback is None
        and "gptq_loss" in entries["model.layers.0.mlp.gate_proj"].extra
    )


def test_skeleton_of_a_gguf_reads_its_metadata_without_converting(tmp_path: Path) -> None:
    from test_export_gguf import build, export, quantized

    model = quantized("llama", QuantSpec("int8", "channel", None))
    path, _ = export(model, tmp_path / "gguf")
    skel = preflight.skeleton(str(path))
    assert not (lowbit.models.converted_dir(path)).exists()  # nothing converted, nothing cached
    shapes = {n: tuple(m.weight.shape) for n, m in preflight.linear_layers(skel).items()}
    want = {n: tuple(m.weight.shape) for n, m in preflight.linear_layers(build("llama", False, True)).items()}
    assert len(want) == 15
    assert {n: s for n, s in shapes.items() if n != "lm_head"} == {n: s for n, s in want.items() if n != "lm_head"}
