"""``lowbit compare`` on a tiny offline model: reuse of checkpoints and stored evaluations (asserted
through the job list in results.json), what results.json holds, an interrupted sweep, refusals, and
the Ray path giving the same results as the in-process one."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from world import CALIB_ARGS, EVAL_ARGS, World, build_world, run_cli

import lowbit.lab.jobs
from lowbit.eval.recovery import recoveries
from lowbit.eval.store import EVAL_DIR, load_result

PRESETS = "w8a16,w4a16-rtn"  # one that reads calibration data (GPTQ), one data-free (RTN)


@dataclass
class Sweep:
    world: World
    out: Path
    first: dict[str, Any]  # results.json of the first run
    second: dict[str, Any]  # of the rerun into the same directory


def _argv(world: World, out: Path, presets: str = PRESETS, *extra: str) -> list[str]:
    return ["compare", str(world.model), "--presets", presets, "--calib", str(world.text), "--out", str(out),
            *CALIB_ARGS, *EVAL_ARGS, "--quiet", *extra]  # fmt: skip


def _compare(world: World, out: Path, presets: str = PRESETS, *extra: str) -> dict[str, Any]:
    rc, stdout, err = run_cli(_argv(world, out, presets, *extra))
    assert rc == 0, err
    assert "jobs (checkpoint/evaluation)" in stdout
    return json.loads((out / "results.json").read_text())


def _numbers(doc: dict[str, Any]) -> dict[str, Any]:
    """results.json without the parts that describe the run (timings, host) and the job list."""
    return {k: v for k, v in doc.items() if k not in ("timings", "host", "jobs")}


def _jobs(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {j["name"]: (j["quantize"], j["evaluate"]) for j in doc["jobs"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    world = build_world(tmp_path_factory.mktemp("compare"))
    out = world.root / "cmp"
    first = _compare(world, out)
    second = _compare(world, out)
    return Sweep(world, out, first, second)


def test_a_rerun_reuses_every_checkpoint_and_evaluation(sweep: Sweep) -> None:
    assert _jobs(sweep.first) == {"w8a16": ("quantized", "computed"), "w4a16-rtn": ("quantized", "computed")}
    assert _jobs(sweep.second) == {"w8a16": ("reused", "reused"), "w4a16-rtn": ("reused", "reused")}
    assert _numbers(sweep.second) == _numbers(sweep.first)
    for name in ("w8a16", "w4a16-rtn"):
        assert (sweep.out / "checkpoints" / name / "lowbit.json").is_file()
        assert (sweep.out / "jobs" / f"{name}.json").is_file()


def test_results_hold_metrics_recoveries_and_layers(sweep: Sweep) -> None:
    doc = sweep.first
    assert [r["name"] for r in doc["rows"]] == ["w8a16", "w4a16-rtn"]
    assert doc["settings"]["samples"] == 4 and doc["settings"]["eval_windows"] == 4
    original = doc["original"]
    assert original["perplexity"] > 1
    for row in doc["rows"]:
        assert row["recovery"] == recoveries(row, original)
        assert row["recovery"]["top1_agreement"] == pytest.approx(100 * row["top1_agreement"])
        ckpt = sweep.out / row["checkpoint"]
        meta = json.loads((ckpt / "lowbit.json").read_text())
        # bits per weight: a plain weighted average over the checkpoint's quantized layers
        sizes = {n: e["shape"][0] * e["shape"][1] for n, e in meta["layers"].items()}
        bits = [(r["bits_per_weight"], sizes[r["name"]]) for r in meta["report"]["layers"]]
        assert row["bits_per_weight"] == pytest.approx(sum(b * n for b, n in bits) / sum(n for _, n in bits))
        assert [e["layer"] for e in doc["layers"][row["name"]]] == [r["name"] for r in meta["report"]["layers"]]
        stored = json.loads((ckpt / EVAL_DIR / f"{doc['data']['eval_key']}.json").read_text())
        assert stored["metrics"]["perplexity"] == row["perplexity"]
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["w4a16-rtn"]["data_free"] and not rows["w8a16"]["data_free"]
    assert rows["w8a16"]["kl"] < rows["w4a16-rtn"]["kl"]  # 8-bit GPTQ is closer to the original than 4-bit RTN
    assert set(doc["timings"]["rows"]) == {"w8a16", "w4a16-rtn"}
    assert doc["host"]["executor"] == "in-process"


def test_tables_match_results(sweep: Sweep) -> None:
    doc = sweep.first
    table = list(csv.DictReader(io.StringIO((sweep.out / "results.csv").read_text())))
    assert [r["name"] for r in table] == ["original", "w8a16", "w4a16-rtn"]
    for row, line in zip(doc["rows"], table[1:], strict=True):
        assert float(line["perplexity"]) == pytest.approx(row["perplexity"])
        assert float(line["kl_recovery"]) == pytest.approx(row["recovery"]["kl"])
    md = (sweep.out / "results.md").read_text().splitlines()
    assert md[0].startswith("| recipe | scheme | bits/w | perplexity |")
    assert len(md) == 2 + 3 and md[3].startswith("| w8a16 |")


def _copy(sweep: Sweep, tmp_path: Path) -> Path:
    out = tmp_path / "cmp"
    shutil.copytree(sweep.out, out)
    return out


def test_other_calibration_requantizes_only_what_reads_it_and_an_added_preset_is_new_work(
    sweep: Sweep, tmp_path: Path
) -> None:
    out = _copy(sweep, tmp_path)
    doc = _compare(sweep.world, out, f"{PRESETS},w6a16-fp6", "--samples", "3")
    assert _jobs(doc) == {
        "w8a16": ("quantized", "computed"),  # GPTQ reads the calibration samples: a new draw, a new checkpoint
        "w4a16-rtn": ("reused", "reused"),  # RTN reads none
        "w6a16-fp6": ("quantized", "computed"),
    }


def test_compare_reads_back_what_lowbit_eval_stored(sweep: Sweep, tmp_path: Path) -> None:
    out = _copy(sweep, tmp_path)
    ckpt = out / "checkpoints" / "w4a16-rtn"
    shutil.rmtree(ckpt / EVAL_DIR)
    w = sweep.world
    rc, _, err = run_cli(["eval", str(ckpt), "--baseline", str(w.model), "--data", str(w.text), *EVAL_ARGS, "--quiet"])
    assert rc == 0, err
    doc = _compare(sweep.world, out)
    assert _jobs(doc) == {"w8a16": ("reused", "reused"), "w4a16-rtn": ("reused", "reused")}
    assert _numbers(doc) == _numbers(sweep.first)


def test_an_interrupted_sweep_keeps_its_finished_checkpoints(
    sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real: Callable[..., dict[str, Any]] = lowbit.lab.jobs.quantize_job
    calls = []

    def interrupted(task: Any, cache: Any = None) -> dict[str, Any]:
        calls.append(task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, cache)

    monkeypatch.setattr(lowbit.lab.jobs, "quantize_job", interrupted)
    out = tmp_path / "cmp"
    rc, _, err = run_cli(_argv(sweep.world, out, "w4a16-rtn,w6a16-fp6"))
    assert rc == 130 and "run the same command again" in err
    assert not (out / "results.json").exists()
    monkeypatch.setattr(lowbit.lab.jobs, "quantize_job", real)
    doc = _compare(sweep.world, out, "w4a16-rtn,w6a16-fp6")
    assert _jobs(doc) == {"w4a16-rtn": ("reused", "computed"), "w6a16-fp6": ("quantized", "computed")}


@pytest.mark.parametrize(
    ("presets", "message"),
    [
        ("w8a16,w8a16", "w8a16 appear twice"),
        ("w5a5", "w5a5"),
        (",", "nothing to compare"),
    ],
)
def test_bad_presets(sweep: Sweep, tmp_path: Path, presets: str, message: str) -> None:
    rc, _, err = run_cli(_argv(sweep.world, tmp_path / "cmp", presets))
    assert rc == 2 and err.startswith("lowbit: error: ") and message in err, err
    assert not (tmp_path / "cmp").exists()


def test_a_foreign_directory_is_refused(sweep: Sweep, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    rc, _, err = run_cli(_argv(sweep.world, tmp_path))
    assert rc == 2 and "not written by `lowbit compare`" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_ray_missing_says_how_to_install(sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    rc, _, err = run_cli([*_argv(sweep.world, tmp_path / "cmp"), "--ray"])
    assert rc == 2 and "pip install 'lowbit[ray]'" in err, err


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'lowbit[ray]')")
def test_ray_gives_the_results_of_the_in_process_run(sweep: Sweep, tmp_path: Path) -> None:
    from lowbit import lab

    w = sweep.world
    doc = lab.compare(
        str(w.model), PRESETS.split(","), out=tmp_path / "cmp", calib=str(w.text), samples=4, seq_len=32,
        eval_windows=4, eval_seq_len=32, ray="local", progress=False,
    )  # fmt: skip
    assert doc == json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert doc["host"]["executor"] == "ray"
    assert _jobs(doc) == _jobs(sweep.first)
    assert _numbers(doc) == _numbers(sweep.first)
    for row in doc["rows"]:
        assert load_result(tmp_path / "cmp" / row["checkpoint"], _settings(sweep, row["checkpoint"])) is not None


def _settings(sweep: Sweep, checkpoint: str) -> dict[str, Any]:
    key = sweep.first["data"]["eval_key"]
    return json.loads((sweep.out / checkpoint / EVAL_DIR / f"{key}.json").read_text())["settings"]


def test_group_size_regroups_only_grouped_recipes() -> None:
    from lowbit.lab.sweep import _recipes

    chosen = _recipes(["w4a16-rtn", "w4a16", "w8a8"], [], 64)
    assert [r.name for r in chosen] == ["w4a16-rtn-g64", "w4a16-g64", "w8a8"]
    assert [r.scheme.weights.group_size for r in chosen[:2]] == [64, 64]  # type: ignore[union-attr]
    assert chosen[2].scheme.weights.granularity == "channel"  # type: ignore[union-attr]


def test_help_names_every_option() -> None:
    rc, out, _ = run_cli(["compare", "--help"])
    assert rc == 0 and out.startswith("usage: lowbit compare")
    for option in ["--presets", "--recipes", "--out", "--calib", "--eval", "--samples", "--seq-len", "--seed",
                   "--group-size", "--eval-windows", "--eval-seq-len", "--batch-size", "--speed", "--ray",
                   "--max-memory", "--device", "--threads", "--json", "--quiet", "--trust-remote-code"]:  # fmt: skip
        assert option in out, option


def test_speed_times_each_checkpoint_against_float32(sweep: Sweep, tmp_path: Path) -> None:
    out = _copy(sweep, tmp_path)
    doc = _compare(sweep.world, out, PRESETS, "--speed")
    assert _jobs(doc) == {"w8a16": ("reused", "reused"), "w4a16-rtn": ("reused", "reused")}
    assert _numbers(doc) == _numbers(sweep.first)  # timings stay out of the numbers
    assert doc["timings"]["speed"] is True
    for name in ("w8a16", "w4a16-rtn"):
        row = doc["timings"]["rows"][name]
        assert row["fp32_tok_s"] > 0
        assert row["kernels_tok_s"] is None or row["kernels_x_fp32"] == pytest.approx(
            row["kernels_tok_s"] / row["fp32_tok_s"]
        )
    assert (out / "plots" / "decode_speed.png").is_file()
    assert "decode tok/s" in (out / "results.md").read_text()


def test_generations_add_rouge_l_against_the_original(sweep: Sweep, tmp_path: Path) -> None:
    """``--generations`` adds ROUGE-L of both decodings to the rows, the recoveries and the
    tables, as a new evaluation of the reused checkpoints (its settings differ)."""
    out = _copy(sweep, tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\nonce upon a time\n")
    doc = _compare(sweep.world, out, PRESETS, "--generations", str(prompts), "--gen-tokens", "6")
    assert _jobs(doc) == {"w8a16": ("reused", "computed"), "w4a16-rtn": ("reused", "computed")}
    for row in doc["rows"]:
        for key in ("rouge_l", "rouge_l_sampled"):
            assert 0.0 <= row[key] <= 1.0
            assert row["recovery"][key] == pytest.approx(100 * row[key])
        assert "embedding_similarity" not in row  # no embedding model given: left out, never downloaded
    assert "ROUGE-L greedy" in (out / "results.md").read_text()
