"""Export quantized models to the formats runtimes load.

One module per format, each importing its optional libraries only when used:

- ``compressed-tensors``: what vLLM and transformers (with the ``compressed-tensors`` package) read;
- ``gptq`` / ``awq``: the Hugging Face GPTQ (``qweight``/``qzeros``/``scales``/``g_idx``) and AWQ GEMM layouts;
- ``gguf``: llama.cpp block formats (f16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K ...);
- ``onnx``: a graph with QuantizeLinear/DequantizeLinear (W8A8) or ``MatMulNBits`` (4-bit) for onnxruntime.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import (
    Exporter,
    ExportResult,
    Problem,
    check_options,
    quantized_linears,
    refusal,
    representation_problems,
)
from lowbit.outdir import atomic_dir, check_free
from lowbit.verify import check_model

# format name -> (module, attribute) of its Exporter instance
EXPORTERS: dict[str, tuple[str, str]] = {
    "compressed-tensors": ("lowbit.export.compressed_tensors", "EXPORTER"),
    "gptq": ("lowbit.export.gptq_layout", "GPTQ_EXPORTER"),
    "awq": ("lowbit.export.gptq_layout", "AWQ_EXPORTER"),
    "gguf": ("lowbit.export.gguf", "EXPORTER"),
    "onnx": ("lowbit.export.onnx", "EXPORTER"),
}


def get_exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTERS:
        raise LowbitError(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORTERS)}")
    module, attr = EXPORTERS[fmt]
    try:
        exporter = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        if (exc.name or "").startswith("lowbit"):
            raise  # our own module is broken or missing: a bug, not a missing package
        raise LowbitError(
            f"the {fmt} exporter needs the package {exc.name!r}, which is not installed; "
            "pip install 'lowbit[export]' (compressed-tensors, onnx, onnxruntime)"
        ) from exc
    assert isinstance(exporter, Exporter)
    return exporter


BCQ_HINT = (
    "BCQ checkpoints run in lowbit itself (eval, run; lowbit.lutgemm for LUT-GEMM); to export, quantize "
    "with a grid method at the same bits instead (e.g. --preset w3a16)"
)


def bcq_problems(model: nn.Module) -> list[Problem]:
    """Layers with BCQ binary codes (LUT-GEMM): no export format stores them (not as a grid of
    scale and zero point, nor as a table lookup), so every exporter refuses them here rather
    than write the dequantized float weight in their place."""
    return [
        Problem(name, "weights representation", f"{m.bcq.describe()}; no {'/'.join(EXPORTERS)} layout holds them")
        for name, m in quantized_linears(model)
        if m.bcq is not None
    ]


def export_model(
    model: nn.Module,
    tokenizer: Any,
    fmt: str,
    out: str | Path,
    options: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model`` (with QuantLinear layers) to ``out`` in format ``fmt``.

    Everything is checked before anything is written (the options, every scale and float tensor
    finite, what the format can hold); the output appears only when complete.
    """
    exporter = get_exporter(fmt)
    options = dict(options or {})
    check_options(exporter, options)
    out = Path(out)
    check_free(out, overwrite)
    try:
        check_model(model)
    except LowbitError as e:
        raise LowbitError(f"cannot export to {fmt}: {e}; nothing was written") from None
    bcq = bcq_problems(model)
    if bcq:
        raise refusal(fmt, bcq, BCQ_HINT)
    # Olive pairs and LoRC factors first: the exporters' own checks read codes as plain grid values
    problems = representation_problems(model) or exporter.check(model, options)
    if problems:
        raise refusal(fmt, problems, exporter.refusal_hint)
    with atomic_dir(out, overwrite) as tmp:
        notes = exporter.write(model, tokenizer, tmp, options)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return ExportResult(out=out, format=fmt, files=files, notes=notes)


def export_checkpoint(
    src: str | Path,
    fmt: str,
    out: str | Path,
    options: Mapping[str, str] | None = None,
    overwrite: bool = False,
    *,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Export a lowbit checkpoint directory (written by ``lowbit quantize``), loaded and checked
    by ``load_quantized`` (``verify=False`` skips its file hashes, not its value checks)."""
    from lowbit.checkpoint import is_quantized_dir, load_quantized

    get_exporter(fmt)  # an unknown format fails before anything else
    src = Path(src)
    if not src.exists():
        raise LowbitError(f"{src} does not exist; give the directory `lowbit quantize --out` wrote")
    if not is_quantized_dir(src):
        raise LowbitError(f"{src} is not a lowbit checkpoint (no lowbit.json); quantize the model first")
    if Path(out).resolve() == src.resolve():
        raise LowbitError("--out is the checkpoint itself; choose another directory")
    model, tokenizer, _ = load_quantized(src, trust_remote_code=trust_remote_code, verify=verify)
    return export_model(model, tokenizer, fmt, out, options, overwrite)


__all__ = ["EXPORTERS", "ExportResult", "Exporter", "export_checkpoint", "export_model", "get_exporter"]
