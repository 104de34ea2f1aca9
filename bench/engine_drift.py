"""How far two engines' logits drift apart on a dynamic per-token W8A8 model, and why.

Quantizes the demo model with int8 per-channel weights and int8 dynamic per-token activations
(RTN), exports it to ONNX, and prints, all from one run:

- the largest relative difference of any linear layer's output between onnxruntime and lowbit,
  each computed on onnxruntime's own input to that layer (the export's exactness);
- the relative difference of the final logits between onnxruntime and lowbit;
- the same logits difference between lowbit with sdpa attention and lowbit with eager attention
  (same weights, only float rounding changes): the drift that per-token rounding amplifies;
- the float model's sdpa vs eager difference, for scale.

    python bench/engine_drift.py
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from lowbit import api
from lowbit.export.onnx_runtime import OnnxLM
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York;"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, attn: str) -> torch.Tensor:
    model.config._attn_implementation = attn
    try:
        return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.config._attn_implementation = "sdpa"


def main() -> None:
    float_model, tok = api.load_model("demo")
    model = copy.deepcopy(float_model)
    scheme = Scheme(
        weights=QuantSpec("int8", "channel", None, symmetric=True),
        input_activations=QuantSpec("int8", "token", None, symmetric=True, dynamic=True),
    )
    calib = tok(["RTN needs no calibration; the pipeline runs the blocks once."], return_tensors="pt")["input_ids"]
    api.quantize(model, Recipe(scheme, (Step("rtn"),)), calib, progress=False)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        api.export_model(model, tok, "onnx", Path(tmp) / "onnx")
        lm = OnnxLM(Path(tmp) / "onnx")
        with torch.no_grad():
            layer = max(rel(y, model.get_submodule(n)(x)) for n, (x, y) in lm.linear_io(ids).items())
        ort_logits, _ = lm(ids)
    ours = logits(model, ids, "sdpa")
    print(f"W8A8 dynamic per-token, demo model, {ids.shape[1]} tokens (max |diff| / max |logit|):")
    print(f"  worst linear layer, onnxruntime vs lowbit on the same input: {layer:.2e}")
    print(f"  logits, onnxruntime vs lowbit:                              {rel(ort_logits, ours):.3f}")
    print(f"  logits, lowbit eager vs lowbit sdpa attention:              {rel(logits(model, ids, 'eager'), ours):.3f}")
    fl = rel(logits(float_model, ids, "eager"), logits(float_model, ids, "sdpa"))
    print(f"  logits, float model eager vs sdpa:                          {fl:.2e}")


if __name__ == "__main__":
    main()
