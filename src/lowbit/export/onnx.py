"""ONNX export for onnxruntime (CPU): the whole decoder as one graph with a KV cache.

Weight-only integer layers become ``com.microsoft.MatMulNBits`` (2, 4 or 8-bit slots holding
lowbit's codes, scales and zero points exactly); layers with int8/uint8 input activations get
``QuantizeLinear``/``DequantizeLinear`` on the input (static per tensor, or dynamic per token
with the range computed in the graph) and, for 8-bit per-channel weights, ``DequantizeLinear``
on the weight into ``MatMul``. See :mod:`lowbit.export.onnx_linear` and
:mod:`lowbit.export.onnx_graph` for what is lowered how; :class:`lowbit.export.onnx_runtime.OnnxLM`
runs the result.

Output: ``model.onnx`` with its weights in ``model.onnx.data``, ``onnx_io.json`` (input and
output names, cache layout, lowering counts, each linear layer's input and output tensor names
for :meth:`~lowbit.export.onnx_runtime.OnnxLM.linear_io`), ``config.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import onnx
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import Exporter, Problem
from lowbit.export.onnx_graph import build_decoder, model_problems
from lowbit.export.onnx_runtime import IO_FILE, MODEL_FILE

DATA_FILE = MODEL_FILE + ".data"
ACCURACY_LEVELS = ("0", "1", "2", "3", "4")
COUNTED_OPS = ("MatMulNBits", "QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")


def _accuracy_level(options: Mapping[str, str]) -> int:
    value = options.get("accuracy_level", "0")
    if value not in ACCURACY_LEVELS:
        raise LowbitError(f"accuracy_level must be one of {', '.join(ACCURACY_LEVELS)}, got {value!r}")
    return int(value)


class OnnxExporter(Exporter):
    name = "onnx"
    description = (
        "ONNX graph with KV cache for onnxruntime (CPU): MatMulNBits for integer weight-only layers, "
        "QuantizeLinear/DequantizeLinear for int8 activations (W8A8); llama, mistral, qwen2, qwen3"
    )
    refusal_hint = (
        "re-quantize with integer weights (and int8 activations) for the layers named, export another "
        "architecture's model to compressed-tensors or gguf instead, or choose another format"
    )
    options_help: ClassVar[Mapping[str, str]] = {
        "accuracy_level": "MatMulNBits accuracy_level: 0 (default: float activations, matches lowbit), 1 fp32, "
        "2 fp16, 3 bf16, 4 int8 activations inside MatMulNBits (faster on CPU, not lowbit's numerics)",
    }

    def check(self, model: nn.Module, options: Mapping[str, str]) -> list[Problem]:
        _accuracy_level(options)
        return model_problems(model)

    def write(self, model: nn.Module, tokenizer: Any, out: Path, options: Mapping[str, str]) -> list[str]:
        level = _accuracy_level(options)
        proto, io = build_decoder(model, level)
        ops = Counter(n.op_type for n in proto.graph.node)
        io["ops"] = {op: ops[op] for op in COUNTED_OPS if ops[op]}
        io["accuracy_level"] = level
        onnx.save_model(
            proto,
            str(out / MODEL_FILE),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
        (out / IO_FILE).write_text(json.dumps(io, indent=1))
        config: Any = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        summary = ", ".join(f"{n} {op}" for op, n in io["ops"].items())
        notes = [
            f"graph: {summary}; KV cache in float32; batches must be unpadded (no attention mask input)",
            "run it with lowbit.export.onnx_runtime.OnnxLM (onnxruntime, CPUExecutionProvider)",
        ]
        if level == 4:
            notes.append(
                "accuracy_level=4: MatMulNBits quantizes activations to int8 per block; logits differ from lowbit's"
            )
        return notes


EXPORTER = OnnxExporter()
