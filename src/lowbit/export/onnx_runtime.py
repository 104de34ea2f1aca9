"""Run an exported ONNX decoder with onnxruntime on CPU, with incremental decoding.

>>> lm = OnnxLM("out/w4a16-onnx", threads=4)
>>> logits, past = lm(input_ids)                    # prefill: (B, S, V) float32
>>> logits, past = lm(next_ids, past)               # one step: (B, 1, V), the cache grows by 1
>>> tokens = lm.generate(input_ids, max_new_tokens=32)

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


class OnnxLM:
    """A causal LM exported by lowbit's ``onnx`` exporter, run by onnxruntime (CPU)."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None) -> None:
        path = Path(onnx_dir)
        if not (path / MODEL_FILE).is_file() or not (path / IO_FILE).is_file():
            raise LowbitError(
                f"{path} holds no lowbit ONNX export ({MODEL_FILE}, {IO_FILE}); run `lowbit export -f onnx`"
            )
        self.io = json.loads((path / IO_FILE).read_text())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise LowbitError(f"threads must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise LowbitError(f"onnxruntime could not load {path / MODEL_FILE}: {exc}") from exc
        self.past_names: list[str] = self.io["inputs"][1:]
        self.output_names: list[str] = self.io["outputs"]
        self.kv_heads: int = self.io["num_kv_heads"]
        self.head_dim: int = self.io["head_dim"]

    def empty_cache(self, batch: int) -> OnnxCache:
        zeros = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        values = [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in self.past_names]
        return OnnxCache(values, 0, batch, [zeros])

    def __call__(self, input_ids: torch.Tensor, past: OnnxCache | None = None) -> tuple[torch.Tensor, OnnxCache]:
        """Logits (B, S, V) float32 of ``input_ids`` (B, S) following ``past``, and the grown cache."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise LowbitError(f"input_ids must be (batch, sequence) with sequence >= 1, got {tuple(input_ids.shape)}")
        ids = np.ascontiguousarray(input_ids.detach().cpu().to(torch.int64).numpy())
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
