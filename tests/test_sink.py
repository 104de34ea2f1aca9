"""lowbit.sink: a checkpoint written block by block, its partial run kept across a kill and resumed,
the format-2 layout (shards + index), and format-1 checkpoints still loading."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import SHAPE, _finish, token_ids
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit.checkpoint as checkpoint
from lowbit import outdir
from lowbit.errors import LowbitError
from lowbit.pipeline import quantize_model
from lowbit.scheme import QuantSpec, Recipe, Scheme
from lowbit.sink import MANIFEST_FILE, CheckpointSink
from lowbit.verify import file_sha256

N_BLOCKS = 3
FINGERPRINT = {"recipe": {"name": "w4-kv8", "steps": ["rtn"]}, "model": "tiny-llama-3", "calib": "abc123"}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A 3-block Llama with grouped int4 weights and a static int8 KV cache (KV tensors per block)."""
    torch.manual_seed(0)
    m = _finish(LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": N_BLOCKS})))
    scheme = Scheme(
        weights=QuantSpec("int4", "group", 32, symmetric=False),
        kv_cache=QuantSpec("int8", "head", None, observer="minmax"),
    )
    quantize_model(m, Recipe(scheme, name="w4-kv8"), token_ids(4, 16), batch_size=4, progress=False)
    return m


@pytest.fixture(scope="module")
def reference(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What save_quantized writes for the model (one writer: it goes through the sink too)."""
    return checkpoint.save_quantized(model, None, tmp_path_factory.mktemp("ref") / "q", {"note": "run"})


def _hidden(i: int) -> list[torch.Tensor]:
    """Made-up boundary activations; chunks of one tensor, so they share storage."""
    g = torch.Generator().manual_seed(i)
    return list(torch.randn(4, 5, 8, generator=g).split(2))


def _state(i: int) -> dict[str, Any]:
    return {"rows": [{"block": i, "error": 0.125 * i}], "seconds": [1.5, i]}


def _write(sink: CheckpointSink, model: nn.Module, blocks: range | list[int]) -> None:
    """What the block runner does per finished block: its tensors, then the boundary after it."""
    for i in blocks:
        prefix = f"model.layers.{i}"
        tensors, layers, kv = checkpoint.block_tensors(model.get_submodule(prefix), prefix)
        sink.write_block(i, tensors, layers, _state(i), kv_cache=kv)
        sink.save_boundary(i, _hidden(i))


def _finish_sink(sink: CheckpointSink, model: nn.Module) -> Path:
    outer, outer_layers = checkpoint.outer_tensors(model)
    return sink.finish(model.config, None, outer, {"note": "run"}, outer_layers=outer_layers)


def _sink(out: Path, resume: bool = False, fingerprint: dict[str, Any] = FINGERPRINT, **kw: Any) -> CheckpointSink:
    return CheckpointSink(out, overwrite=kw.pop("overwrite", False), resume=resume, fingerprint=fingerprint, **kw)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _same_checkpoint(a: Path, b: Path) -> None:
    """Byte-identical files (every shard, the index, lowbit.json with its hashes)."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert [n for n in fa if fa[n] != fb[n]] == []


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "q"
    gc.collect()  # sinks dropped on purpose release their locks


# ---- the streamed checkpoint ------------------------------------------------------------------------


def test_streamed_checkpoint_equals_save_quantized(model: nn.Module, reference: Path, out: Path) -> None:
    with _sink(out) as sink:
        _write(sink, model, range(N_BLOCKS))
        assert sink.finished() == [0, 1, 2]
        assert _finish_sink(sink, model) == out
    _same_checkpoint(out, reference)
    names = set(_files(out))
    assert names >= {checkpoint.block_file(i) for i in range(N_BLOCKS)} | {
        checkpoint.OUTER_FILE,
        checkpoint.INDEX_FILE,
        checkpoint.META_FILE,
        "config.json",
        outdir.MARKER,
    }
    assert MANIFEST_FILE not in names and not any("boundary" in n for n in names)  # bookkeeping is gone
    assert not outdir.partial_dir(out).exists()
    index = json.loads((out / checkpoint.INDEX_FILE).read_text())
    assert index["weight_map"]["model.layers.2.self_attn.k_scale"] == checkpoint.block_file(2)
    assert index["weight_map"]["model.norm.weight"] == checkpoint.OUTER_FILE
    stored = {k: v for f in checkpoint.weight_files(out) for k, v in load_file(str(f)).items()}
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 2
    assert meta["kv_cache"]["granularity"] == "head" and len(meta["layers"]) == 7 * N_BLOCKS
    loaded, _, _ = checkpoint.load_quantized(out)
    ids = token_ids(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("stop", ["abort", "drop"])
def test_killed_run_resumes_to_the_same_checkpoint(model: nn.Module, reference: Path, out: Path, stop: str) -> None:
    first = _sink(out)
    _write(first, model, range(2))
    if stop == "abort":
        first.abort()
    else:  # the process died: nothing ran, the object is just gone
        del first
        gc.collect()
    partial = outdir.partial_dir(out)
    assert partial.is_dir() and not out.exists()
    outdir.check_output(out, False)  # a later run's leftover cleanup keeps the partial run
    assert partial.is_dir()

    sink = _sink(out, resume=True)
    assert sink.finished() == [0, 1]
    boundary = sink.load_boundary()
    assert boundary is not None and boundary[0] == 1
    assert all(torch.equal(a, b) for a, b in zip(boundary[1], _hidden(1), strict=True))
    assert [sink.block_state(i) for i in (0, 1)] == [_state(0), _state(1)]
    _write(sink, model, [2])
    _finish_sink(sink, model)
    _same_checkpoint(out, reference)
    assert not partial.exists()


def test_crash_between_shard_and_manifest(
    model: nn.Module, reference: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after block 1's shard is renamed into place but before the manifest lists it."""
    sink = _sink(out)
    _write(sink, model, [0])
    real = CheckpointSink._write_manifest

    def crash(self: CheckpointSink, blocks: dict[int, Any], boundary: Any) -> None:
        if 1 in blocks:
            raise RuntimeError("killed")
        real(self, blocks, boundary)

    monkeypatch.setattr(CheckpointSink, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _write(sink, model, [1])
    sink.abort()
    monkeypatch.undo()
    assert (outdir.partial_dir(out) / checkpoint.block_file(1)).is_file()  # written, never listed

    sink = _sink(out, resume=True)
    assert sink.finished() == [0]
    assert not (outdir.partial_dir(out) / checkpoint.block_file(1)).exists()  # the unlisted shard is removed
    boundary = sink.load_boundary()
    assert boundary is not None and boundary[0] == 0
    _write(sink, model, [1, 2])
    _finish_sink(sink, model)
    _same_checkpoint(out, reference)


def test_block_after_the_last_boundary_is_written_again(
    model: nn.Module, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = _sink(out)
    _write(sink, model, [0])
    tensors, layers, kv = checkpoint.block_tensors(model.model.layers[1], "model.layers.1")
    sink.write_block(1, tensors, layers, _state(1), kv_cache=kv)  # killed before its boundary
    sink.abort()
    sink = _sink(out, resume=True)
    assert sink.finished() == [0]
    assert "blocks [1]" in capsys.readouterr().err
    sink.abort()


# ---- starting, refusing -------------------------------------------------------------------------------


def test_fingerprint_mismatch_is_refused(model: nn.Module, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = _sink(out)
    _write(sink, model, [0])
    sink.abort()
    other = {**FINGERPRINT, "recipe": {"name": "w8", "steps": ["rtn"]}, "seed": 3}
    with pytest.raises(LowbitError) as info:
        _sink(out, resume=True, fingerprint=other)
    message = str(info.value)
    for fragment in ('recipe.name: "w4-kv8" in the partial run, "w8" now', "seed", "drop --resume", "--overwrite"):
        assert fragment in message, message
    assert outdir.partial_dir(out).is_dir()  # refused: kept as it was
    same = _sink(out, resume=True, fingerprint=json.loads(json.dumps(FINGERPRINT)))  # the lock was released
    assert same.finished() == [0]
    same.abort()
    replaced = _sink(out, resume=True, fingerprint=other, overwrite=True)
    assert replaced.finished() == [] and "different run" in capsys.readouterr().err
    replaced.abort()


def test_resume_without_partial_run_starts_fresh(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = _sink(out, resume=True)
    assert sink.finished() == [] and sink.load_boundary() is None
    assert "no partial run" in capsys.readouterr().err
    sink.abort()


def test_without_resume_a_partial_run_is_replaced(
    model: nn.Module, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = _sink(out)
    _write(sink, model, [0])
    sink.abort()
    sink = _sink(out)
    assert sink.finished() == [] and sink.load_boundary() is None
    assert "replaced the partial run" in capsys.readouterr().err
    with pytest.raises(KeyError):
        sink.block_state(0)
    sink.abort()


def test_lock_refuses_a_second_writer(model: nn.Module, out: Path) -> None:
    sink = _sink(out)
    with pytest.raises(LowbitError, match="being written by another lowbit run"):
        _sink(out, resume=True)
    with pytest.raises(LowbitError, match="being written by another lowbit run"):
        checkpoint.save_quantized(model, None, out, {})
    sink.abort()
    _sink(out, resume=True).abort()  # free again


def test_foreign_partial_directory_is_not_touched(out: Path) -> None:
    partial = outdir.partial_dir(out)
    partial.mkdir(parents=True)
    (partial / "mine.txt").write_text("someone's")
    with pytest.raises(LowbitError, match="not written by lowbit"):
        _sink(out)
    assert (partial / "mine.txt").read_text() == "someone's"


def test_finish_needs_every_block_and_keeps_the_partial_run(model: nn.Module, out: Path) -> None:
    sink = _sink(out)
    _write(sink, model, [0, 2])
    with pytest.raises(LowbitError, match=r"blocks \[1\] were never written"):
        _finish_sink(sink, model)
    assert not out.exists() and outdir.partial_dir(out).is_dir()
    sink = _sink(out, resume=True)  # the lock was released
    assert sink.finished() == []  # the boundary is after block 2, but block 1 is missing: nothing leads to it
    sink.abort()


def test_existing_output_needs_overwrite(model: nn.Module, reference: Path, out: Path) -> None:
    checkpoint.save_quantized(model, None, out, {})
    with pytest.raises(LowbitError, match="already exists"):
        _sink(out)
    with _sink(out, overwrite=True) as sink:
        _write(sink, model, range(N_BLOCKS))
        _finish_sink(sink, model)
    _same_checkpoint(out, reference)


# ---- loading ----------------------------------------------------------------------------------------


def _to_v1(v2: Path, out: Path) -> None:
    """A format-1 checkpoint as lowbit wrote it before shards: every tensor in lowbit.safetensors."""
    out.mkdir()
    tensors = {k: v for f in checkpoint.weight_files(v2) for k, v in load_file(str(f)).items()}
    save_file(tensors, str(out / checkpoint.V1_WEIGHTS_FILE), metadata={"format": "pt", "lowbit": "1"})
    (out / "config.json").write_bytes((v2 / "config.json").read_bytes())
    meta = json.loads((v2 / checkpoint.META_FILE).read_text())
    meta["format_version"] = 1
    meta["sha256"] = {n: file_sha256(out / n) for n in ("config.json", checkpoint.V1_WEIGHTS_FILE)}
    (out / checkpoint.META_FILE).write_text(json.dumps(meta, indent=1))


def test_format_1_checkpoints_still_load(model: nn.Module, reference: Path, tmp_path: Path) -> None:
    old = tmp_path / "v1"
    _to_v1(reference, old)
    assert checkpoint.weight_files(old) == [old / checkpoint.V1_WEIGHTS_FILE]
    loaded, _, meta = checkpoint.load_quantized(old)
    assert meta["format_version"] == 1
    ids = token_ids(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with open(old / checkpoint.V1_WEIGHTS_FILE, "ab") as f:  # its hash is still checked
        f.write(b"\0")
    with pytest.raises(LowbitError, match=r"lowbit\.safetensors does not match the SHA-256"):
        checkpoint.load_quantized(old)


@pytest.mark.parametrize(
    ("index", "fragment"),
    [
        ("{not json", "lowbit.safetensors.index.json is damaged"),
        ('{"weight_map": {"x": "../elsewhere.safetensors"}}', "not a shard of the checkpoint"),
        (None, "lowbit.safetensors.index.json is missing"),
    ],
    ids=["garbage", "outside", "missing"],
)
def test_damaged_index(reference: Path, tmp_path: Path, index: str | None, fragment: str) -> None:
    out = tmp_path / "d"
    out.mkdir()
    for name, data in _files(reference).items():
        (out / name).write_bytes(data)
    if index is None:
        (out / checkpoint.INDEX_FILE).unlink()
    else:
        (out / checkpoint.INDEX_FILE).write_text(index)
    with pytest.raises(LowbitError, match=fragment):
        checkpoint.load_quantized(out, verify=False)


def test_every_shard_must_be_hashed(reference: Path, tmp_path: Path) -> None:
    """An edited lowbit.json cannot leave a shard out of the hash check."""
    out = tmp_path / "d"
    out.mkdir()
    for name, data in _files(reference).items():
        (out / name).write_bytes(data)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    del meta["sha256"][checkpoint.block_file(1)]
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match=f"{checkpoint.block_file(1)} has no SHA-256 in lowbit.json"):
        checkpoint.load_quantized(out)
    checkpoint.load_quantized(out, verify=False)
