"""No code from a model repository runs unless the user asks (``--trust-remote-code``).

The model directory below has a config whose ``auto_map`` points at ``modeling_x.py`` in the directory;
importing that file would write a sentinel file. Without the flag lowbit must refuse with a clear error,
never run the file, and never ask on the terminal (transformers asks when ``trust_remote_code`` is not
given, and only when stdin looks like a terminal); with the flag the file runs.
"""

from __future__ import annotations

import builtins
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tiny_models import tiny_llama, token_ids

import lowbit
from lowbit import api, checkpoint, models, preflight
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.pipeline import quantize_model
from lowbit.presets import get_preset

SRC = str(Path(lowbit.__file__).resolve().parents[1])
MODELING = """
from pathlib import Path
Path({sentinel!r}).write_text("remote code ran")
from transformers import PretrainedConfig
class XConfig(PretrainedConfig):
    model_type = "lowbit-remote-x"
"""


def _remote_model(root: Path) -> tuple[Path, Path]:
    """A directory with an ``auto_map`` config of an unknown model type; returns (directory, sentinel)."""
    model = root / "remote-model"
    model.mkdir()
    sentinel = root / "SENTINEL"
    config = {
        "model_type": "lowbit-remote-x",
        "architectures": ["XForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_x.py").write_text(MODELING.format(sentinel=str(sentinel)))
    return model, sentinel


@pytest.fixture
def no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdin looks like a terminal, and any prompt fails the test."""

    class Tty:
        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            raise AssertionError("lowbit asked on the terminal")

    def refuse(*_args: Any) -> str:
        raise AssertionError("lowbit asked on the terminal")

    monkeypatch.setattr(builtins, "input", refuse)
    monkeypatch.setattr(sys, "stdin", Tty())


def _assert_refused(exc: pytest.ExceptionInfo[LowbitError], sentinel: Path) -> None:
    message = str(exc.value)
    assert "wants to run its own Python code" in message and "--trust-remote-code" in message, message
    assert not sentinel.exists(), "the repository's code ran"


def test_load_model_refuses_remote_code(tmp_path: Path, no_prompt: None) -> None:
    model, sentinel = _remote_model(tmp_path)
    with pytest.raises(LowbitError) as exc:
        models.load_model(str(model))
    _assert_refused(exc, sentinel)
    with pytest.raises(LowbitError) as exc:
        api.load_any(str(model))
    _assert_refused(exc, sentinel)


def test_checkpoint_with_remote_config_is_refused(tmp_path: Path, no_prompt: None) -> None:
    """A lowbit checkpoint whose config.json was edited to need remote code."""
    q = tiny_llama()
    report = quantize_model(q, get_preset("w4a16-rtn"), token_ids(2, 16), batch_size=2, progress=False)
    ckpt = api.save_quantized(q, None, tmp_path / "ckpt", report)
    remote, sentinel = _remote_model(tmp_path)
    (ckpt / "config.json").write_text((remote / "config.json").read_text())
    (ckpt / "modeling_x.py").write_text((remote / "modeling_x.py").read_text())
    with pytest.raises(LowbitError, match="does not match the SHA-256"):  # an edited checkpoint is refused first
        checkpoint.load_quantized(ckpt)
    with pytest.raises(LowbitError) as exc:
        checkpoint.load_quantized(ckpt, verify=False)
    _assert_refused(exc, sentinel)
    with pytest.raises(LowbitError) as exc:
        api.load_any(str(ckpt), verify=False)
    _assert_refused(exc, sentinel)


def test_cli_refuses_remote_code(tmp_path: Path, no_prompt: None, capsys: pytest.CaptureFixture[str]) -> None:
    model, sentinel = _remote_model(tmp_path)
    for argv in (
        ["eval", str(model)],
        ["run", str(model), "--prompt", "hi"],
        ["quantize", str(model), "--no-eval", "--out", str(tmp_path / "out")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--trust-remote-code" in err and "Traceback" not in err, err
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["eval", "M"], "load_any"),
        (["eval", "M", "--baseline", "B"], "load_any"),
        (["run", "M", "--prompt", "hi"], "load_any"),
        (["quantize", "M", "--no-eval", "--out", "OUT"], "skeleton"),  # the first to read the model's config
    ],
)
def test_flag_reaches_the_loader(argv: list[str], target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def loader(spec: str, trust_remote_code: bool = False, *, verify: bool = True) -> Any:
        seen.append(trust_remote_code)
        raise LowbitError("stop here")

    monkeypatch.setattr(preflight if target == "skeleton" else api, target, loader)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    assert main([*argv, "--trust-remote-code"]) == 2
    assert seen == [False, True]


def test_bench_and_export_take_the_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lowbit.export
    import lowbit.speed

    seen: list[bool] = []

    def bench(source: str, settings: Any, log: Any = None) -> Any:
        seen.append(settings.trust_remote_code)
        raise LowbitError("stop here")

    def export_checkpoint(*_args: Any, trust_remote_code: bool = False, verify: bool = True) -> Any:
        seen.append(trust_remote_code)
        raise LowbitError("stop here")

    monkeypatch.setattr(lowbit.speed, "bench", bench)
    monkeypatch.setattr(lowbit.export, "export_checkpoint", export_checkpoint)
    out = str(tmp_path / "out")
    for argv in (["bench", "M"], ["export", "M", "--format", "gguf", "--out", out]):
        assert main(argv) == 2
        assert main([*argv, "--trust-remote-code"]) == 2
    assert seen == [False, True, False, True]


def _cli(args: list[str], stdin: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_MODULES_CACHE": str(cwd / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from lowbit.cli import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_no_prompt_with_a_terminal_or_without_stdin(tmp_path: Path) -> None:
    """In a real process: stdin a pseudo-terminal (where transformers would ask), then closed."""
    model, sentinel = _remote_model(tmp_path)
    parent_fd, child_fd = pty.openpty()
    try:
        started = time.perf_counter()
        with_tty = _cli(["eval", str(model)], child_fd, tmp_path)
        seconds = time.perf_counter() - started
    finally:
        os.close(child_fd)
        os.close(parent_fd)
    without = _cli(["eval", str(model)], subprocess.DEVNULL, tmp_path)
    for result in (with_tty, without):
        assert result.returncode == 2, result.stderr
        assert "wants to run its own Python code" in result.stderr and "Traceback" not in result.stderr
        assert "[y/N]" not in result.stdout + result.stderr
    assert not sentinel.exists()
    assert seconds < 120  # no 15-second wait for an answer either (loose: a shared machine)

    # with the flag, the repository's code is the user's choice and does run
    _cli(["eval", str(model), "--trust-remote-code"], subprocess.DEVNULL, tmp_path)
    assert sentinel.exists()
