"""Exports of the real demo model, read back by each runtime's own code (slow).

The demo's weights come from a Q4_1 GGUF (4-bit, group 32, float minimum); these tests compare
logits of the exported files with lowbit's own quantized model, never quality, so the grid
chosen does not matter here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit import api
from lowbit.export.onnx_runtime import OnnxLM
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

pytestmark = pytest.mark.slow

W4 = QuantSpec("int4", "group", 64, symmetric=True, scale_dtype="float16")  # 576 and 1536 are whole groups
W8 = QuantSpec("int8", "channel", None, symmetric=True)
A8 = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York;"


@pytest.fixture(scope="module")
def demo() -> tuple[torch.nn.Module, Any]:
    return api.load_model("demo")


def _quantized(demo: tuple[torch.nn.Module, Any], scheme: Scheme) -> torch.nn.Module:
    model, tok = demo
    model = copy.deepcopy(model)
    calib = tok(["RTN needs no calibration; the pipeline runs the blocks once."], return_tensors="pt")["input_ids"]
    api.quantize(model, Recipe(scheme, (Step("rtn"),)), calib, progress=False)
    return model


@pytest.fixture(scope="module")
def w4(demo: tuple[torch.nn.Module, Any]) -> torch.nn.Module:
    return _quantized(demo, Scheme(weights=W4))


@pytest.fixture(scope="module")
def w8a8(demo: tuple[torch.nn.Module, Any]) -> torch.nn.Module:
    return _quantized(demo, Scheme(weights=W8, input_activations=A8))


def _ids(demo: tuple[torch.nn.Module, Any]) -> torch.Tensor:
    return demo[1](TEXT, return_tensors="pt")["input_ids"]


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("which", ["w4", "w8a8"])
def test_compressed_tensors_file_loads_in_transformers(
    which: str, request: pytest.FixtureRequest, demo: tuple[torch.nn.Module, Any], tmp_path: Path
) -> None:
    model = request.getfixturevalue(which)
    api.export_model(model, demo[1], "compressed-tensors", tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = _ids(demo)
    assert _rel(_logits(loaded, ids), _logits(model, ids)) < 1e-4


@pytest.mark.parametrize("which", ["w4", "w8a8"])
def test_onnx_file_runs_in_onnxruntime(
    which: str, request: pytest.FixtureRequest, demo: tuple[torch.nn.Module, Any], tmp_path: Path
) -> None:
    model = request.getfixturevalue(which)
    result = api.export_model(model, demo[1], "onnx", tmp_path / "onnx")
    assert "model.onnx" in result.files
    lm = OnnxLM(tmp_path / "onnx")
    ids = _ids(demo)
    if which == "w8a8":
        # Dynamic per-token rounding re-draws its noise once inputs differ in the last bit, so over
        # 30 layers any two engines' logits differ by about the quantization error (lowbit's own sdpa
        # vs eager attention: 13%). Each layer must reproduce lowbit's on its ONNX input instead.
        with torch.no_grad():
            for name, (x, y) in lm.linear_io(ids).items():
                assert _rel(y, model.get_submodule(name)(x)) < 1e-5, name
        return
    logits, _ = lm(ids)
    assert _rel(logits, _logits(model, ids)) < 1e-4  # weight-only: same arithmetic up to summation order
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(lm.generate(ids, max_new_tokens=8), want)
