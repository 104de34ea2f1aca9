"""Run an exported ONNX decoder with onnxruntime on CPU, with incremental decoding.

>>> lm = OnnxLM("out/w4a16-onnx", threads=4)
>>> logits, past = lm(input_ids)                    # prefill: (B, S, V) float32
>>> logits, past = lm(next_ids, past)               # one step: (B, 1, V), the cache grows by 1
>>> tokens = lm.generate(input_ids, max_new_tokens=32)
>>> seen = lm.linear_io(input_ids)                  # {layer: (its input, its output)} in this run

``linear_io`` checks an export layer by layer: each module applied to the input onnxruntime gave
it must reproduce onnxruntime's output. With dynamic per-token activation quantization that is
the test to use on deep models: logits of two engines are not comparable there, since a value
that float rounding puts on the other side of a rounding boundary changes a token's quantized
input by one step, and those changes spread and multiply from layer to layer (30 layers of
SmolLM2-135M W8A8: 30% of the logit scale, as much as lowbit's own model differs between its
sdpa and eager attention).

The KV cache stays in onnxruntime's own buffers (``OrtValue``) between calls: each step binds
the previous step's ``present_*`` outputs as the next step's ``past_*`` inputs, so it is never
copied to or from numpy. Only the logits are handed back as a torch tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lowbit.errors import LowbitError

MODEL_FILE = "model.onnx"
IO_FILE = "onnx_io.json"


@dataclass
class OnnxCache:
    """The KV cache between calls: ``present_key.i``/``present_value.i`` of the last call, in order."""

    values: list[Any]  # onnxruntime OrtValue per cache tensor
    length: int
    batch: int
    _keep: list[np.ndarray] = field(default_factory=list, repr=False)  # buffers the OrtValues view


def _ids(input_ids: torch.Tensor) -> np.ndarray:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise LowbitError(f"input_ids must be (batch, sequence) with sequence >= 1, got {tuple(input_ids.shape)}")
    return np.ascontiguousarray(input_ids.detach().cpu().to(torch.int64).numpy())


class OnnxLM:
    """A causal LM exported by lowbit's ``onnx`` exporter, run by onnxruntime (CPU)."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None) -> None:
        path = Path(onnx_dir)
        if not (path / MODEL_FILE).is_file() or not (path / IO_FILE).is_file():
            raise LowbitError(
                f"{path} holds no lowbit ONNX export ({MODEL_FILE}, {IO_FILE}); run `lowbit export -f onnx`"
            )
        self.path = path
        self.io = json.loads((path / IO_FILE).read_text())
        self.threads = threads
        options = self._options()
        try:
            self.session = ort.InferenceSession(str(path / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise LowbitError(f"onnxruntime could not load {path / MODEL_FILE}: {exc}") from exc
        self.past_names: list[str] = self.io["inputs"][1:]
        self.output_names: list[str] = self.io["outputs"]
        self.kv_heads: int = self.io["num_kv_heads"]
        self.head_dim: int = self.io["head_dim"]

    def _options(self) -> ort.SessionOptions:
        threads = self.threads
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise LowbitError(f"threads must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        return options

    def empty_cache(self, batch: int) -> OnnxCache:
        zeros = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        values = [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in self.past_names]
        return OnnxCache(values, 0, batch, [zeros])

    def __call__(self, input_ids: torch.Tensor, past: OnnxCache | None = None) -> tuple[torch.Tensor, OnnxCache]:
        """Logits (B, S, V) float32 of ``input_ids`` (B, S) following ``past``, and the grown cache."""
        ids = _ids(input_ids)
        batch, seq = ids.shape
        if past is None:
            past = self.empty_cache(batch)
        elif past.batch != batch:
            raise LowbitError(f"the cache holds {past.batch} sequences but input_ids has {batch} rows")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        for name, value in zip(self.past_names, past.values, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = torch.from_numpy(outputs[0].numpy())
        return logits, OnnxCache(list(outputs[1:]), past.length + seq, batch)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: (B, S + max_new_tokens) token ids (the prompt included)."""
        if max_new_tokens < 0:
            raise LowbitError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        tokens = [input_ids.detach().cpu().to(torch.int64)]
        if max_new_tokens == 0:
            return tokens[0]
        logits, past = self(tokens[0])
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                logits, past = self(nxt, past)
        return torch.cat(tokens, dim=1)

    def linear_io(self, input_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each linear layer's input and output in onnxruntime's run of ``input_ids`` (no cache).

        Keys are the layers' module names; the input is the float tensor before any activation
        quantization, so ``module(input)`` is what lowbit computes from the same values.
        """
        linears: dict[str, dict[str, str]] | None = self.io.get("linears")
        if linears is None:
            raise LowbitError(f"{self.path / IO_FILE} lists no linear layers; re-export with this lowbit version")
        proto = onnx.load(str(self.path / MODEL_FILE), load_external_data=False)
        names = list(dict.fromkeys(n for ends in linears.values() for n in (ends["input"], ends["output"])))
        known = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
        options = self._options()  # the weights stay in the export's data file, read from there
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path))
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ids = _ids(input_ids)
        feeds: dict[str, Any] = {"input_ids": ids}
        empty = np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), np.float32)
        feeds.update({name: empty for name in self.past_names})
        values = dict(zip(names, session.run(names, feeds), strict=True))
        return {
            layer: (torch.from_numpy(values[ends["input"]]), torch.from_numpy(values[ends["output"]]))
            for layer, ends in linears.items()
        }
