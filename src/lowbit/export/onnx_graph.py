"""The decoder of a llama-family model as an ONNX graph with a KV cache.

Inputs: ``input_ids`` (B, S) int64 and, per layer, ``past_key.i`` / ``past_value.i``
(B, n_kv_heads, P, head_dim) float32 (P = 0 for the first call). Outputs: ``logits``
(B, S, vocab) float32 and ``present_key.i`` / ``present_value.i`` (B, n_kv_heads, P + S,
head_dim). B, S and P are dynamic. Positions are ``P .. P+S-1`` for every row: batches are
unpadded (no attention mask input). The causal mask is built for any S and P (prefill,
decode, or a chunk after a prefix), with a sliding window on the layers whose config has one.

RMSNorm, RoPE (the model's own ``inv_freq`` and ``attention_scaling``, so default, linear,
llama3 and yarn RoPE are exact; length-dependent kinds are refused), grouped-query attention
(the query heads of a KV head are stacked, so the cache is never repeated), SwiGLU MLP and the
(tied or separate) LM head are plain ONNX ops; the linear layers come from
:mod:`lowbit.export.onnx_linear`. The architectures are data: the ``onnx`` part (an
:class:`~lowbit.archs.OnnxLayout`) of each entry in :data:`lowbit.archs.ARCHS`, and its ``blocks``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from lowbit import archs
from lowbit.archs import Arch, OnnxLayout
from lowbit.export.base import Problem, kv_spec, quantized_linears
from lowbit.export.onnx_builder import FLOAT, INT64, GraphBuilder, value_info
from lowbit.export.onnx_linear import linear_problems, lower_linear

ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # fixed inv_freq: exact in the graph
ACTIVATIONS = ("silu",)
NORMS = ("rms",)  # the table's norm kinds the graph computes


def onnx_arch(model: nn.Module) -> tuple[Arch, OnnxLayout] | None:
    """``model``'s table entry and its ONNX layout (None: unknown, or the ONNX exporter does not support it)."""
    entry = archs.ARCHS.get(archs.model_type_of(model))
    return None if entry is None or entry.onnx is None else (entry, entry.onnx)


def _layers(model: nn.Module, arch: Arch) -> nn.ModuleList:
    layers = model.get_submodule(arch.blocks)
    assert isinstance(layers, nn.ModuleList)
    return layers


def linear_sites(model: nn.Module, arch: Arch, layout: OnnxLayout) -> list[str]:
    """Names of every linear layer the graph computes, in order."""
    names = []
    for i in range(len(_layers(model, arch))):
        names += [f"{arch.blocks}.{i}.{s}" for s in (*layout.attn, *layout.mlp)]
    return [*names, layout.lm_head]


def model_problems(model: nn.Module) -> list[Problem]:
    """Everything that keeps ``model`` out of the graph (empty: it can be built)."""
    config = getattr(model, "config", None)
    found = onnx_arch(model)
    if found is None:
        supported = ", ".join(archs.families_with("onnx"))
        detail = f"{archs.model_type_of(model)!r}; the ONNX exporter builds {supported} decoders"
        return [Problem("model", "architecture", detail)]
    arch, layout = found
    problems = []
    if arch.norm not in NORMS:
        problems.append(Problem("model", "norm", f"{arch.norm!r} norms; the graph has {', '.join(NORMS)}"))
    act = getattr(config, "hidden_act", None)
    if act not in ACTIVATIONS:
        problems.append(Problem("model", "MLP activation", f"{act!r}; the graph has {', '.join(ACTIVATIONS)}"))
    try:
        rope_type = model.get_submodule(layout.rotary).rope_type
    except AttributeError:
        rope_type = None
    if rope_type not in ROPE_TYPES:
        problems.append(Problem("model", "RoPE", f"rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"))
    if kv_spec(model) is not None:
        problems.append(Problem("kv_cache", "KV-cache quantization", "the ONNX graph keeps the KV cache in float32"))
    if not isinstance(model.get_submodule(layout.embed), nn.Embedding):
        problems.append(Problem(layout.embed, "layer type", "the token embedding is not an nn.Embedding"))
    sites = linear_sites(model, arch, layout)
    for name in sites:
        problems += linear_problems(name, model.get_submodule(name))
    for name, _ in quantized_linears(model):
        if name not in sites:
            problems.append(Problem(name, "layer", "a quantized layer outside the decoder's linear layers"))
    return problems


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _weight(module: nn.Module) -> np.ndarray:
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w.detach().cpu().float().numpy()


def _dims(model: nn.Module) -> dict[str, int]:
    c = _config(model)
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"layers": c.num_hidden_layers, "heads": heads, "kv_heads": kv, "head_dim": head_dim,
            "hidden": c.hidden_size, "vocab": c.vocab_size}  # fmt: skip


def sliding_window(config: Any, layer: int) -> int | None:
    """The attention window of one layer (None: full causal attention), as transformers applies it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer] == "sliding_attention" else None
    return window


def build_decoder(model: nn.Module, accuracy_level: int = 0) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The ONNX model and a description of its inputs and outputs. ``model_problems`` must be empty."""
    found = onnx_arch(model)
    assert found is not None, "model_problems() refuses this model"
    d = _dims(model)
    g = GraphBuilder()
    b = _Decoder(g, model, *found, d, accuracy_level)
    logits = b.run()
    n = d["layers"]
    kv_shape: list[int | str | None] = ["batch", d["kv_heads"], "past", d["head_dim"]]
    out_shape: list[int | str | None] = ["batch", d["kv_heads"], "total", d["head_dim"]]
    inputs = [value_info("input_ids", INT64, ["batch", "sequence"])]
    outputs = [value_info(logits, FLOAT, ["batch", "sequence", d["vocab"]])]
    for i in range(n):
        inputs += [value_info(f"past_key.{i}", FLOAT, kv_shape), value_info(f"past_value.{i}", FLOAT, kv_shape)]
        outputs += [value_info(b.present[i][0], FLOAT, out_shape), value_info(b.present[i][1], FLOAT, out_shape)]
    proto = g.model(inputs, outputs, doc=f"{_config(model).model_type} decoder exported by lowbit")
    io = {
        "inputs": ["input_ids", *[f"past_{kind}.{i}" for i in range(n) for kind in ("key", "value")]],
        "outputs": ["logits", *[f"present_{kind}.{i}" for i in range(n) for kind in ("key", "value")]],
        "num_layers": n,
        "num_kv_heads": d["kv_heads"],
        "head_dim": d["head_dim"],
        "vocab_size": d["vocab"],
        "kv_layout": "(batch, num_kv_heads, past_length, head_dim) float32",
        "attention_mask": "none: rows of a batch share positions (no padding)",
        "linears": {name: {"input": x, "output": y} for name, (x, y) in b.linears.items()},
    }
    return proto, io


class _Decoder:
    def __init__(
        self, g: GraphBuilder, model: nn.Module, arch: Arch, layout: OnnxLayout, d: dict[str, int], acc: int
    ) -> None:
        self.g, self.model, self.layout, self.d, self.acc = g, model, layout, d, acc
        self.blocks = arch.blocks
        self.present: list[tuple[str, str]] = []
        self.linears: dict[str, tuple[str, str]] = {}  # layer -> its input and output tensor names

    def _w(self, name: str) -> str:
        return self.g.tensor(f"{name}.weight", _weight(self.model.get_submodule(name)))

    def rms_norm(self, x: str, name: str) -> str:
        g = self.g
        mod = self.model.get_submodule(name)
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
        var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.ints(-1), keepdims=1)
        normed = g.op("Div", x, g.op("Sqrt", g.op("Add", var, g.const(eps))))
        return g.op("Mul", normed, self._w(name), name=name)

    def linear(self, x: str, name: str) -> str:
        y = lower_linear(self.g, x, name, self.model.get_submodule(name), self.acc)
        self.linears[name] = (x, y)
        return y

    def run(self) -> str:
        g, layout, d = self.g, self.layout, self.d
        self._positions()
        self.embed = self._w(layout.embed)
        h = g.op("Gather", self.embed, "input_ids", axis=0, name="embeddings")
        for i in range(d["layers"]):
            prefix = f"{self.blocks}.{i}"
            attn = self.attention(self.rms_norm(h, f"{prefix}.{layout.input_norm}"), i)
            h = g.op("Add", h, attn, name=f"{prefix}.attn_res")
            x = self.rms_norm(h, f"{prefix}.{layout.post_norm}")
            gate_n, up_n, down_n = (f"{prefix}.{s}" for s in layout.mlp)
            gate = self.linear(x, gate_n)
            act = g.op("Mul", gate, g.op("Sigmoid", gate))
            h = g.op("Add", h, self.linear(g.op("Mul", act, self.linear(x, up_n)), down_n), name=f"{prefix}.out")
        return self.lm_head(self.rms_norm(h, layout.final_norm))

    def lm_head(self, x: str) -> str:
        g, layout = self.g, self.layout
        head = self.model.get_submodule(layout.lm_head)
        embed = self.model.get_submodule(layout.embed)
        assert isinstance(embed, nn.Embedding)
        if not (isinstance(head, nn.Linear) and head.weight.data_ptr() == embed.weight.data_ptr()):
            return g.op("Identity", self.linear(x, layout.lm_head), name="logits")
        # tied: Gemm reads the embedding matrix itself (transB), so it is stored once
        x2 = g.op("Reshape", x, g.ints(-1, self.d["hidden"]))
        bias = [] if head.bias is None else [g.tensor("lm_head.bias", head.bias.detach().cpu().float().numpy())]
        y = g.op("Gemm", x2, self.embed, *bias, transB=1)
        shape = g.op("Concat", g.op("Shape", "input_ids"), g.ints(self.d["vocab"]), axis=0)
        return g.op("Reshape", y, shape, name="logits")

    def _positions(self) -> None:
        """cos/sin of the RoPE angles (1, 1, S, D) and the additive masks, shared by all layers."""
        g = self.g
        past = g.op("Squeeze", g.op("Shape", "past_key.0", start=2, end=3), g.ints(0), name="past_len")
        seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.ints(0), name="seq_len")
        total = g.op("Add", past, seq, name="total_len")
        one = g.const(1, np.int64)
        self.pos = g.op("Range", past, total, one, name="positions")  # (S,)
        self.kv_pos = g.op("Range", g.const(0, np.int64), total, one, name="kv_positions")  # (T,)
        rotary = self.model.get_submodule(self.layout.rotary)
        inv_freq = rotary.get_buffer("inv_freq").detach().cpu().float().numpy().reshape(1, -1)
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", self.pos, to=FLOAT), g.ints(1)), g.const(inv_freq))
        emb = g.op("Concat", freqs, freqs, axis=-1)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        cos, sin = g.op("Cos", emb), g.op("Sin", emb)
        if scaling != 1.0:
            cos, sin = g.op("Mul", cos, g.const(scaling)), g.op("Mul", sin, g.const(scaling))
        self.cos = g.op("Unsqueeze", cos, g.ints(0, 1), name="rope_cos")
        self.sin = g.op("Unsqueeze", sin, g.ints(0, 1), name="rope_sin")

    def mask(self, window: int | None) -> str:
        """(n_rep * S, T) additive mask: 0 where a query may attend, a very negative number elsewhere."""

        def make() -> str:
            g = self.g
            q = g.op("Unsqueeze", self.pos, g.ints(1))
            k = g.op("Unsqueeze", self.kv_pos, g.ints(0))
            allowed = g.op("LessOrEqual", k, q)
            if window is not None:  # transformers: kv > q - window
                allowed = g.op("And", allowed, g.op("Greater", k, g.op("Sub", q, g.const(window, np.int64))))
            neg = g.const(float(np.finfo(np.float32).min))
            m = g.op("Where", allowed, g.const(0.0), neg)
            n_rep = self.d["heads"] // self.d["kv_heads"]
            return g.op("Tile", m, g.ints(n_rep, 1), name=f"mask_w{window}" if window else "mask")

        return self.g.memo(("mask", window), make)

    def rope(self, x: str) -> str:
        g, half = self.g, self.d["head_dim"] // 2
        x1 = g.op("Slice", x, g.ints(0), g.ints(half), g.ints(-1))
        x2 = g.op("Slice", x, g.ints(half), g.ints(2 * half), g.ints(-1))
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, self.cos), g.op("Mul", rotated, self.sin))

    def heads(self, x: str, n: int, norm: str | None) -> str:
        """(B, S, n*D) -> (B, n, S, D), with the per-head norm if the family has one."""
        g = self.g
        x = g.op("Reshape", x, g.ints(0, 0, n, self.d["head_dim"]))
        if norm is not None:
            x = self.rms_norm(x, norm)
        return g.op("Transpose", x, perm=[0, 2, 1, 3])

    def attention(self, x: str, i: int) -> str:
        g, d, layout = self.g, self.d, self.layout
        prefix = f"{self.blocks}.{i}"
        q_n, k_n, v_n, o_n = (f"{prefix}.{s}" for s in layout.attn)
        q_norm, k_norm = (f"{prefix}.{s}" for s in layout.qk_norm) if layout.qk_norm else (None, None)
        q = self.rope(self.heads(self.linear(x, q_n), d["heads"], q_norm))
        k = self.rope(self.heads(self.linear(x, k_n), d["kv_heads"], k_norm))
        v = self.heads(self.linear(x, v_n), d["kv_heads"], None)
        key = g.op("Concat", f"past_key.{i}", k, axis=2, name=f"present_key.{i}")
        value = g.op("Concat", f"past_value.{i}", v, axis=2, name=f"present_value.{i}")
        self.present.append((key, value))
        # the n_rep query heads of each KV head stacked along the sequence: (B, n_kv, n_rep*S, D)
        q = g.op("Mul", q, g.const(1.0 / math.sqrt(d["head_dim"])))
        q = g.op("Reshape", q, g.ints(0, d["kv_heads"], -1, d["head_dim"]))
        scores = g.op("MatMul", q, g.op("Transpose", key, perm=[0, 1, 3, 2]))
        scores = g.op("Add", scores, self.mask(sliding_window(_config(self.model), i)))
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), value)
        ctx = g.op("Transpose", g.op("Reshape", ctx, g.ints(0, d["heads"], -1, d["head_dim"])), perm=[0, 2, 1, 3])
        return self.linear(g.op("Reshape", ctx, g.ints(0, 0, d["heads"] * d["head_dim"])), o_n)
