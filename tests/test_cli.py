"""Tests for lowbit.cli: every command run in-process on a tiny random Llama with an offline tokenizer.

The module fixture saves a 2-layer LlamaForCausalLM and a word-level tokenizer (a few hundred words)
with ``save_pretrained``, writes a few thousand words of text, and runs ``lowbit quantize --json`` once;
the tests reuse that checkpoint and its printed result.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging
from world import WORDS, word_tokenizer
from world import run_cli as _run

import lowbit
import lowbit.models
from lowbit import api
from lowbit.cli import build_parser, default_out_dir, main
from lowbit.outdir import MARKER
from lowbit.presets import DEFAULT_PRESET, PRESETS

EVAL_ARGS = ["--eval-windows", "4", "--eval-seq-len", "32"]
CALIB_ARGS = ["--samples", "4", "--seq-len", "32"]


@dataclass
class Setup:
    model: Path  # the float model directory (save_pretrained + tokenizer)
    text: Path  # ~3000 words, one token each
    out: Path  # the w8a16 checkpoint written by the fixture's quantize run
    result: dict[str, Any]  # the JSON that quantize printed


@pytest.fixture(autouse=True)
def _no_demo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may fetch the demo model: a test that tries fails instead of downloading."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))

    def refuse() -> Path:
        raise AssertionError("a CLI test tried to fetch the demo model")

    monkeypatch.setattr(lowbit.models, "fetch_demo_model", refuse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("cli")
    tok = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model_dir = root / "tiny-llama-0.1"  # a dot in the name: the default --out must keep it
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    text = root / "text.txt"
    lines = (" ".join(rng.choice(WORDS) for _ in range(15)) for _ in range(200))
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "w8a16"
    argv = ["quantize", str(model_dir), "--preset", "w8a16", "--calib", str(text), *CALIB_ARGS, *EVAL_ARGS]
    rc, stdout, stderr = _run([*argv, "--out", str(out), "--quiet", "--json"])
    assert rc == 0, stderr
    return Setup(model_dir, text, out, json.loads(stdout))  # stdout is the JSON and nothing else


def _assert_usage_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    assert err.startswith("lowbit: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# --- presets, help, defaults -----------------------------------------------------------------------


def test_presets_table_with_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "scheme", "steps", "description"]
    assert [line.split()[0] for line in lines[1:]] == list(PRESETS)
    # aligned: every column starts at the same place on every line
    starts = {line.index(PRESETS[line.split()[0]].description) for line in lines[1:]}
    assert starts == {lines[0].index("description")}
    assert DEFAULT_PRESET == "w4a16"
    (w4a16,) = [line for line in lines if line.split()[0] == "w4a16"]
    assert PRESETS["w4a16"].scheme.describe() in w4a16 and "gptq" in w4a16


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_name_prints_a_recipe_that_loads_back(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["presets", name]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# {name}: {PRESETS[name].description}")
    (tmp_path / "r.yaml").write_text(text)
    assert api.resolve_recipe(str(tmp_path / "r.yaml")) == api.resolve_recipe(name)


def test_presets_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "w5a5"]) == 2
    assert "unknown preset 'w5a5'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"


QUANTIZE_OPTIONS = [
    "--preset", "--recipe", "--calib", "--samples", "--seq-len", "--seed", "--out", "--overwrite", "--no-eval",
    "--eval-data", "--eval-windows", "--eval-seq-len", "--batch-size", "--json", "--quiet",
]  # fmt: skip
EVAL_OPTIONS = ["--baseline", "--data", "--eval-windows", "--eval-seq-len", "--batch-size", "--json", "--quiet"]


def _subparser(name: str) -> Any:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices[name]  # type: ignore[index]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["quantize", "eval", "presets", "examples:"]),
        (["quantize"], ["model", *QUANTIZE_OPTIONS]),
        (["eval"], ["model", *EVAL_OPTIONS]),
        (["presets"], []),
    ],
)
def test_help_mentions_every_option(
    capsys: pytest.CaptureFixture[str], command: list[str], expected: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: lowbit")
    registered = [s for a in (_subparser(command[0]) if command else build_parser())._actions for s in a.option_strings]
    for option in [*expected, *registered]:
        assert option in text, option


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args([]).command is None
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lowbit") and "quantize" in out


def test_quantize_defaults_are_the_demo() -> None:
    args = build_parser().parse_args(["quantize"])
    assert (args.command, args.model, args.calib) == ("quantize", "demo", "demo")
    assert args.preset is None and args.recipe is None and args.out is None and args.eval_data is None
    assert (args.samples, args.seq_len, args.seed) == (16, 512, 0)
    assert (args.eval_windows, args.eval_seq_len, args.batch_size) == (16, 512, 4)
    assert not (args.overwrite or args.no_eval or args.json or args.quiet)
    # what _quantize uses when neither --preset nor --recipe is given
    assert api.resolve_recipe(args.recipe or args.preset or DEFAULT_PRESET).name == "w4a16"
    assert default_out_dir(args.model, "w4a16") == Path("lowbit-out/demo-w4a16")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("demo", "demo-w4a16"),
        ("Qwen/Qwen2-0.5B", "Qwen2-0.5B-w4a16"),  # a Hub id keeps its ".5B"
        ("./models/llama-3.1-8b/", "llama-3.1-8b-w4a16"),
        ("/data/SmolLM2-135M.Q4_1.GGUF", "SmolLM2-135M.Q4_1-w4a16"),  # only the .gguf suffix goes
    ],
)
def test_default_out_dir(model: str, expected: str) -> None:
    assert default_out_dir(model, "w4a16") == Path("lowbit-out") / expected


def test_default_out_dir_of_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert default_out_dir(".", "w8a8") == Path("lowbit-out/my-model-w8a8")


# --- quantize --------------------------------------------------------------------------------------


def test_quantize_json(setup: Setup) -> None:
    assert {p.name for p in setup.out.iterdir()} >= {"lowbit.json", "lowbit.safetensors.index.json", "config.json"}
    assert not [p for p in setup.out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    summary, rows = setup.result["summary"], setup.result["eval"]
    assert summary["recipe"] == "w8a16" and summary["out"] == str(setup.out)
    assert summary["calibration"].startswith("4 x 32 tokens")
    assert 8 < summary["bits_per_weight"] < 9  # int8 codes + one float32 scale per output channel
    assert summary["file_mb"] == sum(p.stat().st_size for p in setup.out.glob("*.safetensors")) / 2**20
    meta = json.loads((setup.out / "lowbit.json").read_text())
    assert meta["scheme"]["weights"]["format"] == "int8"
    assert meta["scheme"]["weights"]["granularity"] == "channel"

    assert [r["model"] for r in rows] == ["baseline", "quantized"]
    base, quant = rows
    for row in rows:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert (row["n_windows"], row["seq_len"], row["n_tokens"]) == (4, 32, 4 * 31)
    assert quant["baseline_perplexity"] == base["perplexity"]
    assert quant["kl"] > 0  # the weights really changed ...
    assert quant["kl"] < 1e-3  # ... but only by 8-bit rounding
    assert 0 <= quant["top1_agreement"] <= 1
    assert quant["perplexity"] != base["perplexity"]


@pytest.fixture
def hf_bars_on() -> Iterator[None]:
    """transformers' progress bars enabled for the test, the previous setting restored after it."""
    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not before:
        hf_logging.disable_progress_bar()


def test_quantize_table_and_quiet(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], hf_bars_on: None
) -> None:
    argv = ["quantize", str(setup.model), "--preset", "w8a16", "--calib", str(setup.text), *CALIB_ARGS, *EVAL_ARGS]
    assert main([*argv, "--out", str(tmp_path / "q"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "perplexity" in out and "baseline" in out and "quantized" in out and "bits_per_weight" in out
    assert "evaluation: 4 windows x 32 tokens" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    # --quiet: no bars at all, transformers' "Loading weights" included; its global setting is restored
    assert "Loading weights" not in err and "%|" not in err, err
    assert hf_logging.is_progress_bar_enabled()


def test_quantize_default_out_dir(setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", str(setup.model), "--preset", "w8a16", "--calib", str(setup.text), *CALIB_ARGS]
    rc, out, err = _run([*argv, "--no-eval", "--quiet", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["eval"] == []
    assert result["summary"]["out"] == str(Path("lowbit-out/tiny-llama-0.1-w8a16"))
    assert (tmp_path / "lowbit-out/tiny-llama-0.1-w8a16/lowbit.json").is_file()


# --- eval ------------------------------------------------------------------------------------------


def test_eval_matches_quantize(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", str(setup.out), "--baseline", str(setup.model), "--data", str(setup.text), *EVAL_ARGS]
    assert main([*argv, "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["baseline"], result["data"]) == (str(setup.out), str(setup.model), str(setup.text))
    base, quant = result["eval"]
    want_base, want_quant = setup.result["eval"]
    assert (base["model"], quant["model"]) == ("baseline", "quantized")
    # the reloaded checkpoint on the same windows: the numbers quantize printed for the in-memory model
    assert base["perplexity"] == pytest.approx(want_base["perplexity"], rel=1e-6)
    assert quant["perplexity"] == pytest.approx(want_quant["perplexity"], rel=1e-6)
    assert quant["kl"] == pytest.approx(want_quant["kl"], rel=1e-4)
    assert quant["top1_agreement"] == want_quant["top1_agreement"]

    assert main([*argv, "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "baseline" in table and "KL" in table


def test_eval_model_against_itself(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(setup.model)
    argv = ["eval", model, "--baseline", model, "--data", str(setup.text), *EVAL_ARGS, "--json", "--quiet"]
    assert main(argv) == 0
    base, same = json.loads(capsys.readouterr().out)["eval"]
    assert abs(same["kl"]) < 1e-9
    assert same["top1_agreement"] == 1.0
    assert same["perplexity"] == base["perplexity"] == setup.result["eval"][0]["perplexity"]


def test_eval_without_baseline(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", str(setup.out), "--data", str(setup.text), *EVAL_ARGS, "--json", "--quiet"]
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)["eval"]
    assert row["model"] == "model" and row["kl"] is None and row["top1_agreement"] is None
    assert row["perplexity"] == pytest.approx(setup.result["eval"][1]["perplexity"], rel=1e-6)


def test_eval_checkpoint_without_tokenizer(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(setup.out, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    argv = ["eval", str(bare), "--data", str(setup.text), *EVAL_ARGS, "--json", "--quiet"]
    _assert_usage_error(main(argv), capsys.readouterr().err, "tokenizer.json is missing", "--no-verify")
    argv.append("--no-verify")  # removed on purpose
    rc = main(argv)
    _assert_usage_error(rc, capsys.readouterr().err, "no tokenizer files", "--baseline")
    assert main([*argv, "--baseline", str(setup.model)]) == 0  # the baseline's tokenizer is used
    rows = json.loads(capsys.readouterr().out)["eval"]
    assert rows[1]["perplexity"] == pytest.approx(setup.result["eval"][1]["perplexity"], rel=1e-6)


# --- recipes ---------------------------------------------------------------------------------------

RECIPE = """\
preset: w4a16
scheme:
  weights: {format: int4, granularity: group, GROUP: 32}
"""


def test_recipe_file(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("GROUP", "group_size"))
    out = tmp_path / "g32"
    argv = ["quantize", str(setup.model), "--recipe", str(recipe), "--calib", str(setup.text), *CALIB_ARGS]
    # --recipe overrides --preset
    assert main([*argv, "--preset", "w8a16", "--out", str(out), "--no-eval", "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    # merged into w4a16's weight spec: int4 + its fp16 scale per 32 weights (w4a16's g128: 4.125)
    assert summary["bits_per_weight"] == 4.5
    assert summary["scheme"] == "W: int4 g32 sym mse fp16-scale" and summary["recipe"] == "w4a16-g32"
    weights = json.loads((out / "lowbit.json").read_text())["scheme"]["weights"]
    assert (weights["format"], weights["granularity"], weights["group_size"]) == ("int4", "group", 32)


def test_recipe_misspelled_field(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("GROUP", "grup_size"))
    out = tmp_path / "never"
    argv = ["quantize", str(setup.model), "--recipe", str(recipe), "--calib", str(setup.text), "--out", str(out)]
    rc = main([*argv, "--quiet"])
    _assert_usage_error(rc, capsys.readouterr().err, "'grup_size'", "did you mean 'group_size'")
    assert not out.exists()


# --- errors ----------------------------------------------------------------------------------------


def _short_text(tmp_path: Path) -> str:
    path = tmp_path / "short.txt"
    path.write_text(" ".join(WORDS[:20]))
    return str(path)


def _argv(setup: Setup, model: str | None = None, calib: str | None = None, *extra: str) -> list[str]:
    """A quantize command line that works, with one thing changed; --out is ./out."""
    model, calib = model or str(setup.model), calib or str(setup.text)
    return ["quantize", model, "--calib", calib, "--out", "out", *CALIB_ARGS, *EVAL_ARGS, "--quiet", *extra]


ERROR_CASES: dict[str, tuple[Callable[[Setup, Path], list[str]], list[str]]] = {
    "unknown preset": (
        lambda s, t: _argv(s, None, None, "--preset", "w5a16"),
        ["unknown preset 'w5a16'", "lowbit presets"],
    ),
    "missing model": (lambda s, t: _argv(s, "./nope"), ["model path './nope' does not exist"]),
    "missing calib": (lambda s, t: _argv(s, None, "missing.txt"), ["text source 'missing.txt' does not exist"]),
    "missing recipe": (
        lambda s, t: _argv(s, None, None, "--recipe", "nope.yaml"),
        ["recipe file nope.yaml does not exist"],
    ),
    "calib too short": (
        lambda s, t: _argv(s, None, _short_text(t), "--no-eval"),
        ["(calib split) has only 20 tokens, and 33 are needed", "shorter sequence length"],
    ),
    # found before quantizing, so nothing is written
    "eval data too short": (
        lambda s, t: _argv(s, None, None, "--eval-data", _short_text(t)),
        ["(eval split) has only 20 tokens, and 32 are needed"],
    ),
    "missing eval data": (
        lambda s, t: _argv(s, None, None, "--eval-data", "nope/eval.txt"),
        ["text source 'nope/eval.txt' does not exist"],
    ),
    "out under a file": (
        lambda s, t: [*_argv(s, None, None, "--no-eval"), "--out", str(s.text / "sub")],
        ["could not write", str(Path("text.txt") / "sub")],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_quantize_errors(
    case: str, setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    make_argv, fragments = ERROR_CASES[case]
    rc = main(make_argv(setup, tmp_path))
    _assert_usage_error(rc, capsys.readouterr().err, *fragments)
    assert [p.name for p in tmp_path.iterdir() if p.name != "short.txt"] == []  # nothing (half-)written
    assert sorted(p.name for p in setup.text.parent.iterdir()) == sorted(["text.txt", "tiny-llama-0.1", "w8a16"])
    assert setup.text.is_file()


def test_eval_missing_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "./nope", "--data", "missing.txt", "--quiet"])
    _assert_usage_error(rc, capsys.readouterr().err, "'./nope' does not exist")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--batch-size", "0"), ("--samples", "0"), ("--seq-len", "-3"), ("--eval-windows", "x"), ("--eval-seq-len", "0")],
)
def test_counts_must_be_positive(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    """Rejected while parsing (exit 2, a usage message), before any model is loaded."""
    argv = ["quantize", str(setup.model), "--calib", str(setup.text), "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_overwrite(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["quantize", str(setup.model), "--preset", "w8a16", "--calib", str(setup.text), *CALIB_ARGS]
    argv += ["--out", str(out), "--no-eval", "--quiet"]
    rc = main(argv)
    _assert_usage_error(rc, capsys.readouterr().err, f"output {out} already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    rc = main([*argv, "--overwrite"])  # not lowbit's: not even --overwrite replaces it
    _assert_usage_error(rc, capsys.readouterr().err, "was not written by lowbit", "will not replace it")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    (out / MARKER).write_text('{"written_by": "lowbit"}')  # an output of lowbit's (or so it says)
    assert main([*argv, "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["out"] == str(out)
    assert not (out / "keep.txt").exists()
    assert {"lowbit.json", "lowbit-outer.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup directories left behind


def test_default_out_is_replaced_on_rerun_but_a_foreign_directory_is_not(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["quantize", str(setup.model), "--preset", "w8a16", "--calib", str(setup.text), *CALIB_ARGS]
    argv += ["--no-eval", "--quiet", "--json"]
    assert main(argv) == 0
    out = Path(json.loads(capsys.readouterr().out)["summary"]["out"])
    assert (tmp_path / out / "lowbit.json").is_file()
    assert main(argv) == 0  # a rerun replaces lowbit's own earlier default output
    assert Path(json.loads(capsys.readouterr().out)["summary"]["out"]) == out
    assert sorted(p.name for p in (tmp_path / out).parent.iterdir()) == [out.name]  # nothing left over

    foreign = tmp_path / out
    for f in foreign.iterdir():
        f.unlink()
    (foreign / "notes.txt").write_text("mine")
    rc = main(argv)
    _assert_usage_error(rc, capsys.readouterr().err, "already exists", "--overwrite")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_method_and_layers(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", str(setup.model), "--preset", "w4a16", "--calib", str(setup.text), *CALIB_ARGS]
    assert main([*argv, "--method", "rtn", "--layers", "--no-eval", "--quiet", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "w4a16-rtn" in out and "model.layers.1.mlp.down_proj" in out and "GPTQ loss" in out
    meta = json.loads((tmp_path / "r" / "lowbit.json").read_text())
    assert [next(iter(s)) if isinstance(s, dict) else s for s in meta["recipe"]["steps"]] == ["rtn"]
    assert main([*argv, "--layers", "--no-eval", "--quiet", "--out", str(tmp_path / "g")]) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("model.layers.0.self_attn.q_proj")
    ]
    assert len(lines) == 1 and "0.01" in lines[0]  # GPTQ's damping is shown per layer
    assert main([*argv, "--method", "gpqt", "--no-eval", "--quiet", "--out", str(tmp_path / "x")]) == 2
    _assert_usage_error(2, capsys.readouterr().err, "did you mean 'gptq'")
    assert not (tmp_path / "x").exists()


def test_group_size_on_any_preset(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", str(setup.model), "--preset", "w8a16", "--method", "rtn", "--group-size", "32"]
    argv += ["--calib", str(setup.text), *CALIB_ARGS, "--no-eval", "--quiet", "--json", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["recipe"] == "w8a16-rtn-g32" and "int8 g32" in summary["scheme"]
    assert summary["threads"] == 1
    recipe = json.loads((tmp_path / "o" / "lowbit.json").read_text())["recipe"]
    assert recipe["name"] == "w8a16-rtn-g32" and recipe["scheme"]["weights"]["group_size"] == 32


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "OUT", "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "--raw", "--quiet"],
        ["bench", "OUT", "--batch", "1", "--prompt-len", "8", "--new-tokens", "2", "--paths", "fp32,lowbit,kernels"],
    ],
    ids=["run", "bench"],
)
def test_run_and_bench_raise_no_deprecation_warnings(setup: Setup, argv: list[str]) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = _run([str(setup.out) if a == "OUT" else a for a in argv])
    assert rc == 0, err
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]
    assert not deprecations, [str(w.message) for w in deprecations]


def test_api_and_cli_share_their_defaults() -> None:
    import inspect

    from lowbit import defaults

    args = build_parser().parse_args(["quantize"])
    calib = inspect.signature(api.calibration_samples).parameters
    windows = inspect.signature(api.eval_windows).parameters
    assert (args.samples, args.seq_len, args.seed) == (defaults.CALIB_SAMPLES, defaults.CALIB_SEQ_LEN, defaults.SEED)
    assert (calib["n_samples"].default, calib["seq_len"].default, calib["seed"].default) == (
        args.samples,
        args.seq_len,
        args.seed,
    )
    assert (windows["n_windows"].default, windows["seq_len"].default) == (args.eval_windows, args.eval_seq_len)
    for fn in (api.quantize, api.evaluate):
        assert inspect.signature(fn).parameters["batch_size"].default == args.batch_size
