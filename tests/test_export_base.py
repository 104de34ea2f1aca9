"""The export front door: format lookup, option checks, refusals that name layers, atomic output."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from tiny_models import tiny_llama, token_ids
from torch import nn

import lowbit.export as export
from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.base import Exporter, Problem, dividing_groups, parse_options, quantized_linears, refusal
from lowbit.outdir import MARKER
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset


class FakeExporter(Exporter):
    """Refuses down_proj layers when asked to; otherwise writes one file per quantized linear."""

    name = "fake"
    options_help: ClassVar[Mapping[str, str]] = {"refuse": "refuse every down_proj", "fail": "raise while writing"}

    def check(self, model: nn.Module, options: Mapping[str, str]) -> list[Problem]:
        if options.get("refuse") != "yes":
            return []
        return [Problem(n, "group size", "g32; fake needs g64") for n, _ in quantized_linears(model) if "down" in n]

    def write(self, model: nn.Module, tokenizer: Any, out: Path, options: Mapping[str, str]) -> list[str]:
        for n, _ in quantized_linears(model):
            (out / f"{n}.bin").write_text("x")
            if options.get("fail") == "yes":
                raise OSError("disk full")
        return ["a note"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeExporter:
    exporter = FakeExporter()
    real = export.get_exporter
    monkeypatch.setattr(export, "get_exporter", lambda fmt: exporter if fmt == "fake" else real(fmt))
    return exporter


@pytest.fixture(scope="module")
def quantized() -> nn.Module:
    model = tiny_llama()
    quantize_model(model, get_preset("w4a16-rtn"), token_ids(2, 16), batch_size=2, progress=False)
    return model


def test_unknown_format_lists_the_formats() -> None:
    with pytest.raises(LowbitError, match=r"unknown export format 'safetensor'.*compressed-tensors.*gguf.*onnx"):
        export.get_exporter("safetensor")


@pytest.mark.parametrize("pairs", [["type"], ["=Q4_0"], ["type Q4_0"]])
def test_malformed_options(pairs: list[str]) -> None:
    with pytest.raises(LowbitError, match="not KEY=VALUE"):
        parse_options(pairs)


def test_options_parse() -> None:
    assert parse_options(["type = Q4_K", "x=a=b"]) == {"type": "Q4_K", "x": "a=b"}


def test_unknown_option_names_the_known_ones(fake: FakeExporter, quantized: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="fake has no option colour; its options: fail, refuse"):
        export.export_model(quantized, None, "fake", tmp_path / "o", {"colour": "red"})
    assert not (tmp_path / "o").exists()


def test_refusal_names_property_count_and_layers(fake: FakeExporter, quantized: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(LowbitError) as err:
        export.export_model(quantized, None, "fake", tmp_path / "o", {"refuse": "yes"})
    msg = str(err.value)
    n_down = sum("down_proj" in n for n, _ in quantized_linears(quantized))
    assert f"group size: g32; fake needs g64 [{n_down} layer(s): model.layers.0.mlp.down_proj" in msg
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_refusal_groups_and_shortens() -> None:
    problems = [Problem(f"l{i}", "bits", "3") for i in range(5)] + [Problem("kv", "kv cache", "dynamic")]
    msg = str(refusal("gguf", problems))
    assert "bits: 3 [5 layer(s): l0, l1, l2, ... (+2 more)]" in msg
    assert "kv cache: dynamic [1 layer(s): kv]" in msg


def test_writes_atomically_and_reports_files(fake: FakeExporter, quantized: nn.Module, tmp_path: Path) -> None:
    result = export.export_model(quantized, None, "fake", tmp_path / "o")
    assert result.notes == ["a note"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.name != MARKER) == result.files
    assert (tmp_path / "o" / MARKER).is_file()  # lowbit's own output: --overwrite may replace it
    assert len(result.files) == len(quantized_linears(quantized))


def test_failed_write_leaves_nothing_and_keeps_the_old_output(
    fake: FakeExporter, quantized: nn.Module, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(LowbitError, match="already exists"):
        export.export_model(quantized, None, "fake", out)
    with pytest.raises(LowbitError, match="not written by lowbit"):
        export.export_model(quantized, None, "fake", out, overwrite=True)
    (out / MARKER).write_text('{"written_by": "lowbit"}')  # as if lowbit had written it
    with pytest.raises(LowbitError, match="disk full"):
        export.export_model(quantized, None, "fake", out, {"fail": "yes"}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    export.export_model(quantized, None, "fake", out, overwrite=True)
    assert not (out / "keep.txt").exists()


def test_checkpoint_errors(tmp_path: Path, fake: FakeExporter) -> None:
    with pytest.raises(LowbitError, match="does not exist"):
        export.export_checkpoint(tmp_path / "nope", "fake", tmp_path / "o")
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        export.export_checkpoint(tmp_path, "fake", tmp_path / "o")
    with pytest.raises(LowbitError, match="unknown export format"):
        export.export_checkpoint(tmp_path / "nope", "zip", tmp_path / "o")


def test_cli_export_from_checkpoint(fake: FakeExporter, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_llama()
    report = quantize_model(model, get_preset("w4a16-rtn"), token_ids(2, 16), batch_size=2, progress=False)
    ckpt = api.save_quantized(model, None, tmp_path / "ckpt", report)
    assert main(["export", str(ckpt), "--format", "fake", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"wrote fake to {tmp_path / 'o'}" in out and "note: a note" in out
    assert main(["export", str(ckpt), "--format", "fake", "--out", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "fake", "--out", str(ckpt)]) == 2
    assert "is the model itself" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "fake", "--opt", "refuse", "--out", str(tmp_path / "p")]) == 2
    assert "not KEY=VALUE" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "fake", "--opt", "refuse=yes", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "cannot export to fake" in err and "mlp.down_proj" in err
    assert not (tmp_path / "p").exists()


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name="onnxruntime")

    monkeypatch.setattr(export.importlib, "import_module", fail)
    with pytest.raises(LowbitError, match=r"needs the package 'onnxruntime'.*pip install 'lowbit\[export\]'"):
        export.get_exporter("onnx")


@pytest.mark.parametrize(
    ("width", "hint"),
    [(576, "groups of 64 or 32 divide it"), (1536, "groups of 256 or 128 or 64 or 32 divide it"), (100, "per-channel")],
)
def test_group_size_hint(width: int, hint: str) -> None:
    assert hint in dividing_groups(width)
