"""A small helper that collects ONNX nodes and initializers with unique names.

``op`` adds one node and returns its output name(s); ``const`` adds a small constant once per
value; ``tensor`` adds a named weight; ``memo`` shares a sub-graph (the same input quantized
once for q/k/v, say) between the layers that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # QuantizeLinear/DequantizeLinear with block_size and int4 types; onnxruntime 1.17+
MS_DOMAIN = "com.microsoft"  # MatMulNBits


class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: set[str] = set()
        self._consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._memo: dict[Any, Any] = {}

    def fresh(self, hint: str) -> str:
        """A name not used yet, based on ``hint``."""
        name, i = hint, 1
        while name in self._used:
            name, i = f"{hint}_{i}", i + 1
        self._used.add(name)
        return name

    def op(self, op_type: str, *inputs: str, name: str = "", outputs: int = 1, domain: str = "", **attrs: Any) -> str:
        """Add a node with one output; its name is returned. ``""`` skips an optional input."""
        return self.op_n(op_type, *inputs, name=name, outputs=outputs, domain=domain, **attrs)[0]

    def op_n(
        self, op_type: str, *inputs: str, name: str = "", outputs: int = 1, domain: str = "", **attrs: Any
    ) -> list[str]:
        base = self.fresh(name or op_type.lower())
        outs = [base if i == 0 else self.fresh(f"{base}_out{i}") for i in range(outputs)]
        node = helper.make_node(op_type, list(inputs), outs, name=f"{base}_node", domain=domain or None, **attrs)
        self.nodes.append(node)
        return outs

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A small constant initializer (shared between all uses of the same value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes)."""
        return self.const(list(values), np.int64)

    def tensor(self, name: str, arr: np.ndarray) -> str:
        """A named initializer (weights); the name is made unique if taken."""
        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key``; later calls return the first result."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def model(
        self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto], doc: str = ""
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "lowbit_decoder", list(inputs), list(outputs), self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="lowbit", doc_string=doc)
        model.ir_version = 10  # onnxruntime 1.20+ reads IR 10
        return model


def value_info(name: str, elem: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
