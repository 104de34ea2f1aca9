"""Every example in every ``--help`` that takes the demo's default output runs as written (slow).

The default output is made by ``lowbit quantize`` with no model, preset or recipe (the README's
main command); a smaller calibration set (and evaluation set) is used here, which does not change its
name or format.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from world import run_cli

from lowbit.cli import EPILOG, EXPORT_EPILOG

pytestmark = pytest.mark.slow
DEFAULT_OUT = "lowbit-out/demo-w4a16-g64"


def _examples() -> list[str]:
    lines = [line.strip() for text in (EPILOG, EXPORT_EPILOG) for line in text.splitlines()]
    return [line.split("  #")[0].strip() for line in lines if line.startswith("lowbit ") and DEFAULT_OUT in line]


def test_the_examples_use_the_default_output() -> None:
    assert {shlex.split(e)[1] for e in _examples()} >= {"eval", "run", "export"}
    formats = {shlex.split(e)[shlex.split(e).index("--format") + 1] for e in _examples() if " export " in f" {e} "}
    assert formats == {"compressed-tensors", "gptq", "awq", "gguf", "onnx"}  # every format takes it


def test_help_examples_run_on_the_default_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(["quantize", "--samples", "4", "--seq-len", "128", "--no-eval", "--quiet"])
    assert rc == 0, err
    assert (tmp_path / DEFAULT_OUT / "lowbit.json").is_file(), out
    for example in _examples():
        argv = shlex.split(example)[1:]
        if argv[0] == "eval":  # fewer windows than the default 64, as the calibration set above is smaller
            argv += ["--eval-windows", "2"]
        rc, out, err = run_cli(argv)
        assert rc == 0, (example, err[-2000:])
