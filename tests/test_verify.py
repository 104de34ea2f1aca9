"""lowbit.verify: file hashes and value checks, as pure functions and through save/load/export."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama, token_ids

import lowbit.checkpoint as checkpoint
import lowbit.verify as verify
from lowbit import api, sink
from lowbit.cli import build_parser
from lowbit.errors import LowbitError
from lowbit.formats import FLOAT_FORMATS, get_format
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec, Recipe, Scheme


def _raises(fragment: str) -> Any:
    return pytest.raises(LowbitError, match=fragment)


# ---- pure functions ---------------------------------------------------------------------------------


def test_file_sha256_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(verify, "CHUNK", 1000)  # many chunks, the last one short
    assert verify.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_check_finite_counts_nan_and_inf() -> None:
    verify.check_finite("ok", torch.ones(3))
    verify.check_finite("ints are always finite", torch.arange(3))
    with _raises("^t has 2 NaN values and 1 infinite value$"):
        verify.check_finite("t", torch.tensor([float("nan"), 1.0, float("nan"), float("-inf")]))


def test_check_scale_needs_finite_positive() -> None:
    verify.check_scale("s", torch.tensor([1e-30, 3.0]))
    with _raises("s has 1 infinite value"):
        verify.check_scale("s", torch.tensor([float("inf"), 3.0]))
    with _raises("s has 2 values <= 0"):
        verify.check_scale("s", torch.tensor([0.0, -1.0, 1.0]))


@pytest.mark.parametrize(
    ("fmt", "good", "bad", "fragment"),
    [
        ("uint4", [0, 15], [16], "outside the uint4 code range 0..15"),
        ("int8", [-128, 127], [-129], "outside the int8 code range -128..127"),
        ("uint8", [3], [2.5], "outside the uint8 code range"),  # not an integer
        ("int4", [0], [float("nan")], "1 NaN value"),
    ],
)
def test_check_zero_point_range(fmt: str, good: list[float], bad: list[float], fragment: str) -> None:
    verify.check_zero_point("z", torch.tensor(good), get_format(fmt))
    with _raises(fragment):
        verify.check_zero_point("z", torch.tensor(good + bad), get_format(fmt))


@pytest.mark.parametrize("name", sorted(FLOAT_FORMATS))
def test_check_codes_refuses_exactly_the_non_finite_bit_patterns(name: str) -> None:
    fmt = FLOAT_FORMATS[name]
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
    n_bad = int(torch.isnan(fmt.from_codes(codes)).sum())
    if n_bad == 0:  # fp6/fp4: every bit pattern is a value
        verify.check_codes("w", codes, fmt)
        return
    with _raises(f"w has {n_bad} code"):
        verify.check_codes("w", codes, fmt)
    verify.check_codes("w", fmt.to_codes(fmt.grid()), fmt)  # every grid value's code passes
    verify.check_codes("w", torch.tensor([255], dtype=torch.uint8), get_format("uint8"))  # integers: any code


def test_check_qweight_names_each_part() -> None:
    w = torch.randn(8, 64)
    w[2] = 0.0  # a group of zeros: scale 1, accepted
    qw = quantize_weight(w, QuantSpec("uint4", "group", 32, symmetric=False))
    verify.check_qweight("L", qw)
    qw.scale[0, 1] = float("nan")
    with _raises("^L.weight_scale has 1 NaN value$"):
        verify.check_qweight("L", qw)
    qw.scale[0, 1] = 1.0
    qw.zero_point[1, 0] = 16.0
    with _raises("^L.weight_zero_point has 1 value outside"):
        verify.check_qweight("L", qw)
    qw.zero_point[1, 0] = 3.0
    qw.outlier_idx, qw.outlier_weight = torch.tensor([5]), torch.full((8, 1), float("inf"), dtype=torch.float16)
    with _raises("^L.weight_outlier has 8 infinite values$"):
        verify.check_qweight("L", qw)


def test_verify_hashes(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"b")
    table = verify.hash_files(tmp_path, verify.list_files(tmp_path))
    assert list(table) == ["a", "sub/b"]
    verify.verify_hashes(tmp_path, {})  # no table: nothing to verify
    verify.verify_hashes(tmp_path, {"sha256": table})
    (tmp_path / "unlisted.lock").write_bytes(b"")  # files nobody listed are not checked
    verify.verify_hashes(tmp_path, {"sha256": table})
    (tmp_path / "sub" / "b").write_bytes(b"B")
    with _raises(f"{tmp_path / 'sub' / 'b'} does not match the SHA-256"):
        verify.verify_hashes(tmp_path, {"sha256": table})
    for bad in ({"/etc/passwd": "0"}, {"../a": "0"}, {"a": 1}, "a"):
        with _raises("lowbit.json"):
            verify.verify_hashes(tmp_path, {"sha256": bad})


# ---- through save, load and export ---------------------------------------------------------------------


def _save(recipe: Recipe, out: Path) -> Path:
    model = tiny_llama(tie=True)
    report = quantize_model(model, recipe, token_ids(4, 16, seed=1), batch_size=4, progress=False)
    return api.save_quantized(model, None, out, report)


def _edit(out: Path, name: str, change: Any) -> None:
    weight_map = checkpoint.json.loads((out / checkpoint.INDEX_FILE).read_text())["weight_map"]
    path = out / weight_map[name]
    tensors = load_file(str(path))
    change(tensors[name])
    save_file(tensors, str(path))


def test_nan_bit_pattern_in_fp8_codes(tmp_path: Path) -> None:
    out = _save(get_preset("w8a8-fp8"), tmp_path / "q")
    _edit(out, "model.layers.1.mlp.up_proj.weight_packed", lambda t: t.view(-1)[:3].fill_(0x7F))  # E4M3 NaN
    with _raises("model.layers.1.mlp.up_proj.weight_packed has 3 codes that are not finite fp8_e4m3 values"):
        checkpoint.load_quantized(out, verify=False)


def test_static_kv_scale(tmp_path: Path) -> None:
    scheme = Scheme(weights=QuantSpec("int8", "channel"), kv_cache=QuantSpec("int8", "head", None, observer="minmax"))
    out = _save(Recipe(scheme, name="kv-static"), tmp_path / "q")
    checkpoint.load_quantized(out)
    _edit(out, "model.layers.0.self_attn.v_scale", lambda t: t.view(-1)[0].fill_(-1.0))
    with _raises("model.layers.0.self_attn.v_scale has 1 value <= 0"):
        checkpoint.load_quantized(out, verify=False)


def test_marker_files_are_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what save_quantized writes is hashed; a file other code puts in the directory is not."""
    finish = sink.CheckpointSink.finish

    def with_marker(self: sink.CheckpointSink, *args: Any, **kwargs: Any) -> Path:
        (self.partial / ".lowbit-writing").write_text("pid")
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(sink.CheckpointSink, "finish", with_marker)
    out = _save(get_preset("w8a16"), tmp_path / "q")
    meta = checkpoint.json.loads((out / checkpoint.META_FILE).read_text())
    shards = {checkpoint.block_file(0), checkpoint.block_file(1), checkpoint.OUTER_FILE, checkpoint.INDEX_FILE}
    assert set(meta["sha256"]) == {"config.json", *shards}
    (out / ".lowbit-writing").write_text("another pid")
    checkpoint.load_quantized(out)


def test_export_refuses_non_finite_scales_and_writes_nothing(tmp_path: Path) -> None:
    out = _save(get_preset("w4a16"), tmp_path / "q")
    model, _, _ = checkpoint.load_quantized(out)
    model.get_submodule("model.layers.1.self_attn.o_proj").qweight.scale[2, 0] = float("inf")
    with _raises("cannot export to gguf: model.layers.1.self_attn.o_proj.weight_scale has 1 infinite value"):
        api.export_model(model, None, "gguf", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_checkpoint_verifies_unless_told_not_to(tmp_path: Path) -> None:
    out = _save(get_preset("w4a16"), tmp_path / "q")
    _edit(out, "model.norm.weight", lambda t: t.__setitem__(0, float("nan")))
    with _raises("does not match the SHA-256"):
        api.export_checkpoint(out, "gguf", tmp_path / "x")
    with _raises("model.norm.weight has 1 NaN value"):
        api.export_checkpoint(out, "gguf", tmp_path / "x", verify=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["eval", "export", "run", "bench"])
def test_every_loading_command_takes_no_verify(command: str) -> None:
    extra = {"export": ["--format", "gguf", "--out", "x"], "run": ["--prompt", "hi"]}.get(command, [])
    args = build_parser().parse_args([command, "ckpt", *extra, "--no-verify"])
    assert args.no_verify
    assert not build_parser().parse_args([command, "ckpt", *extra]).no_verify
