"""Streamed jobs (``lowbit.job``): a model read block by block from its files into a sink gives
the checkpoint of the in-memory path; an interrupted job resumes to the uninterrupted result;
workers, memory budgets and data-free recipes change nothing in the checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from world import World, build_world

import lowbit.pipeline
from lowbit import api
from lowbit.errors import LowbitError
from lowbit.golden import checkpoint_digests, golden_recipes
from lowbit.job import Job, run_job
from lowbit.pipeline import RunOptions
from lowbit.presets import get_preset
from lowbit.scheme import Recipe, Step

OPTIONS = RunOptions(batch_size=2, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def _recipe(name: str) -> Recipe:
    if name == "w8a8-static+rtn":
        return dataclasses.replace(get_preset("w8a8-static"), steps=(Step("smoothquant"), Step("rtn")), name=name)
    # learned rounding against the float model's path, which a resume recomputes; 40 steps flip codes on
    # the tiny model, so a resume that started the path from the wrong hidden states writes other codes
    if name == "w4a16-ar-model":
        ar = get_preset("w4a16-ar")
        steps = tuple(
            Step(s.name, {**s.params, "iters": 40, "teacher": "model", "precision": "fp32"})
            if s.name == "adaround"
            else s
            for s in ar.steps
        )
        return dataclasses.replace(ar, steps=steps, name=name)
    if name in golden_recipes():
        return golden_recipes()[name]
    return get_preset(name)


def _job(world: World, out: Path, recipe: str, **kw: Any) -> Job:
    fields: dict[str, Any] = {"calib": str(world.text), "samples": 6, "seq_len": 32, "options": OPTIONS, **kw}
    return Job(str(world.model), _recipe(recipe), out, **fields)


def _in_memory(world: World, out: Path, recipe: str) -> dict[str, str]:
    model, tok = api.load_model(str(world.model))
    calib = api.calibration_samples(tok, str(world.text), n_samples=6, seq_len=32)
    report = api.quantize(model, _recipe(recipe), calib, batch_size=2, progress=False)
    api.save_quantized(model, tok, out, report)
    return checkpoint_digests(out)


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8-static", "w4a16-rtn", "w4a16-awq", "w8a8-sqplus", "w8a8-osplus"])
def test_a_streamed_job_writes_the_in_memory_checkpoint(world: World, tmp_path: Path, recipe: str) -> None:
    report = run_job(_job(world, tmp_path / "streamed", recipe))
    assert checkpoint_digests(tmp_path / "streamed") == _in_memory(world, tmp_path / "memory", recipe)
    _, _, meta = api.load_quantized(tmp_path / "streamed")
    assert len(meta["layers"]) == len(report.layers) == 14
    assert (report.forward_passes == 0) == (recipe == "w4a16-rtn")


class Killed(Exception):
    pass


def _count_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the blocks the runner emits (their indices, in order)."""
    emit = lowbit.pipeline._emit
    processed: list[int] = []

    def counted(sink: Any, block: Any, prefix: str, index: int, *rest: Any) -> None:
        processed.append(index)
        emit(sink, block, prefix, index, *rest)

    monkeypatch.setattr(lowbit.pipeline, "_emit", counted)
    return processed


@pytest.mark.parametrize(
    ("where", "recipe"),
    [
        ("after block 0", "w4a16"),
        ("between block 0 and its outputs", "w4a16"),
        ("after block 0", "w4a16-ar-model"),
    ],
)
def test_a_killed_job_resumes_to_the_uninterrupted_checkpoint(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, recipe: str
) -> None:
    whole = run_job(_job(world, tmp_path / "whole", recipe))
    emit = lowbit.pipeline._emit

    def killed(sink: Any, block: Any, prefix: str, index: int, *rest: Any) -> None:
        if where == "after block 0":
            emit(sink, block, prefix, index, *rest)
        else:  # the block is written, the process dies before its outputs are
            sink.save_boundary = lambda *_: (_ for _ in ()).throw(Killed())
            emit(sink, block, prefix, index, *rest)
        raise Killed

    monkeypatch.setattr(lowbit.pipeline, "_emit", killed)
    with pytest.raises(Killed):
        run_job(_job(world, tmp_path / "resumed", recipe))
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").is_dir()
    monkeypatch.undo()

    processed = _count_blocks(monkeypatch)
    report = run_job(_job(world, tmp_path / "resumed", recipe, resume=True))
    # after block 0 it came from the partial run; without its outputs it is done again
    assert processed == ([1] if where == "after block 0" else [0, 1])
    assert len(report.layers) == 14 and len(report.block_errors) == 2
    # the finished block's errors against the float model come back from the partial run
    assert len(report.model_errors) == (2 if recipe == "w4a16-ar-model" else 0)
    assert report.model_errors == pytest.approx(whole.model_errors, rel=1e-6)
    assert checkpoint_digests(tmp_path / "resumed") == checkpoint_digests(tmp_path / "whole")
    for f in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "resumed" / f.name).read_bytes(), f.name


def test_resume_refuses_a_partial_run_of_another_recipe(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emit = lowbit.pipeline._emit

    def once(*args: Any) -> None:
        emit(*args)
        raise Killed

    monkeypatch.setattr(lowbit.pipeline, "_emit", once)
    with pytest.raises(Killed):
        run_job(_job(world, tmp_path / "out", "w4a16"))
    monkeypatch.undo()
    with pytest.raises(LowbitError, match="--resume"):
        run_job(_job(world, tmp_path / "out", "w4a16-asym", resume=True))


@pytest.mark.parametrize("recipe", ["w8a8-static+rtn"])
def test_two_workers_write_the_single_process_checkpoint(world: World, tmp_path: Path, recipe: str) -> None:
    run_job(_job(world, tmp_path / "one", recipe))
    report = run_job(_job(world, tmp_path / "two", recipe), workers=2)
    assert report.n_samples == 6
    one, two = api.load_quantized(tmp_path / "one")[0], api.load_quantized(tmp_path / "two")[0]
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_memory_budget_writes_the_same_checkpoint(world: World, tmp_path: Path) -> None:
    run_job(_job(world, tmp_path / "free", "w4a16"))
    budget = dataclasses.replace(OPTIONS, max_memory=4096, spill_dir=tmp_path / "spill")
    (tmp_path / "spill").mkdir()
    report = run_job(_job(world, tmp_path / "budget", "w4a16", options=budget))
    assert report.spilled_bytes > 0
    assert checkpoint_digests(tmp_path / "budget") == checkpoint_digests(tmp_path / "free")


def test_resume_with_workers_is_refused(world: World, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="resume with one worker"):
        run_job(_job(world, tmp_path / "out", "w4a16", resume=True), workers=2)


def test_cli_resume_after_an_interrupt(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from world import CALIB_ARGS, run_cli

    out = tmp_path / "out"
    argv = ["quantize", str(world.model), "--preset", "w4a16", "--calib", str(world.text), *CALIB_ARGS]
    argv += ["--out", str(out), "--no-eval", "--quiet", "--max-memory", "1KB"]
    emit = lowbit.pipeline._emit

    def interrupted(sink: Any, block: Any, prefix: str, index: int, *rest: Any) -> None:
        emit(sink, block, prefix, index, *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit.pipeline, "_emit", interrupted)
    rc, _, err = run_cli(argv)
    assert rc == 130 and "add --resume to the same command" in err
    assert (tmp_path / ".out.partial").is_dir() and not out.exists()
    monkeypatch.undo()
    processed = _count_blocks(monkeypatch)
    rc, _, err = run_cli([*argv, "--resume"])
    assert rc == 0, err
    assert processed == [1]
    whole = tmp_path / "whole"
    rc, _, err = run_cli([*argv[: argv.index("--out")], "--out", str(whole), "--no-eval", "--quiet"])
    assert rc == 0, err
    assert checkpoint_digests(out) == checkpoint_digests(whole)


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5kb", 1536), ("100", 100)])
def test_max_memory_sizes(text: str, size: int) -> None:
    from lowbit.cli_parser import _size

    assert _size(text) == size


def test_max_memory_refuses_nonsense() -> None:
    from world import run_cli

    rc, _, err = run_cli(["quantize", "--max-memory", "lots"])
    assert rc == 2 and "expected a size such as 2GB or 512MB" in err
