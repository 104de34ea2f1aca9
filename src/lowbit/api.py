"""The small Python API: load, calibrate, quantize, save, load back, evaluate.

>>> from lowbit import api
>>> model, tok = api.load_model("demo")                   # Hub id, directory, .gguf or "demo"
>>> calib = api.calibration_samples(tok, "demo", n_samples=32, seq_len=512)
>>> report = api.quantize(model, "w4a16", calib)          # preset name, Recipe or YAML path
>>> api.quantize_to("demo", "w4a16", "out/big", calib="demo")  # streamed: never loads the model whole
>>> api.save_quantized(model, tok, "out/w4a16", report)
>>> qmodel, tok, meta = api.load_quantized("out/w4a16")
>>> result = api.evaluate(qmodel, api.eval_windows(tok, "demo"), baseline=model_fp)
>>> api.export_model(qmodel, tok, "gguf", "out/w4a16-gguf", {"type": "Q4_K"})  # or compressed-tensors, onnx, ...
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import defaults
from lowbit.checkpoint import is_quantized_dir, load_quantized
from lowbit.checkpoint import save_quantized as _save
from lowbit.data import calibration_samples, eval_windows, load_texts
from lowbit.errors import LowbitError
from lowbit.eval import EvalResult, evaluate
from lowbit.export import export_checkpoint, export_model
from lowbit.models import load_model
from lowbit.modules import QuantLinear
from lowbit.pipeline import RunReport, quantize_model
from lowbit.presets import get_preset
from lowbit.recipes import load_recipe
from lowbit.scheme import Recipe, Step

__all__ = [
    "EvalResult",
    "RunReport",
    "bits_per_weight",
    "calibration_samples",
    "eval_windows",
    "evaluate",
    "export_checkpoint",
    "export_model",
    "is_quantized_dir",
    "load_any",
    "load_model",
    "load_quantized",
    "load_texts",
    "qat",
    "quantize",
    "quantize_to",
    "resolve_recipe",
    "save_quantized",
    "with_method",
]


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe from a preset name, a YAML file path or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_recipe(text)
    return get_preset(text)


def with_method(recipe: Recipe, method: str) -> Recipe:
    """``recipe`` with its quantizer step replaced by ``method`` (default parameters), named
    ``<recipe>-<method>``; transforms stay. Unchanged if the recipe already uses ``method``."""
    from lowbit.algorithms import ALGORITHMS, build_algorithm

    build_algorithm(method, {})  # an unknown name gets the usual error with suggestions
    if ALGORITHMS[method].kind != "quantizer":
        quantizers = sorted(n for n, a in ALGORITHMS.items() if a.kind == "quantizer")
        raise LowbitError(f"{method!r} is not a weight quantizer; choose one of {', '.join(quantizers)}")
    if any(s.name == method for s in recipe.steps):
        return recipe
    steps = (*(s for s in recipe.steps if ALGORITHMS[s.name].kind != "quantizer"), Step(method))
    return dataclasses.replace(recipe, steps=steps, name=f"{recipe.name}-{method}")


def quantize(
    model: nn.Module,
    recipe: str | Path | Recipe,
    calib: torch.Tensor,
    batch_size: int = defaults.BATCH_SIZE,
    progress: bool = True,
    device: str = "cpu",
) -> RunReport:
    """Quantize ``model`` in place; ``calib`` is (n, T) token ids from ``calibration_samples``.
    ``device``: where each block and its activations are processed (cpu, cuda, cuda:N or auto);
    the model stays where it is between blocks.

    The recipe is checked against the model's layers first (``preflight.check_recipe``: patterns
    that match nothing, group sizes that do not divide a layer's width), before any calibration pass.
    """
    from lowbit.preflight import check_recipe

    resolved = resolve_recipe(recipe)
    check_recipe(resolved, model)
    return quantize_model(model, resolved, calib, batch_size=batch_size, progress=progress, device=device)


def quantize_to(
    model: str,
    recipe: str | Path | Recipe,
    out: str | Path,
    *,
    calib: str = "demo",
    samples: int = defaults.CALIB_SAMPLES,
    seq_len: int = defaults.CALIB_SEQ_LEN,
    seed: int = defaults.SEED,
    batch_size: int = defaults.BATCH_SIZE,
    max_memory: int | None = None,
    device: str = "cpu",
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> RunReport:
    """Quantize the model ``model`` names (Hub id, directory, .gguf, "demo") into the checkpoint
    directory ``out``, one block at a time: the model is never loaded whole, each block is
    written when finished, and ``resume=True`` continues an interrupted run. ``max_memory``
    (bytes) bounds the calibration activations held in memory; ``workers`` splits the
    calibration samples over that many processes."""
    from lowbit.job import Job, run_job
    from lowbit.pipeline import RunOptions

    options = RunOptions(batch_size, progress, max_memory, device)
    job = Job(model, resolve_recipe(recipe), Path(out), calib, samples, seq_len, seed, options)
    job = dataclasses.replace(job, overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code)
    return run_job(job, workers=workers)


def save_quantized(
    model: nn.Module, tokenizer: Any, out_dir: str | Path, report: RunReport, overwrite: bool = False
) -> Path:
    """Write a quantized model; the scheme, recipe and run report go into ``lowbit.json``."""
    provenance = report.provenance(getattr(getattr(model, "config", None), "_name_or_path", None))
    try:
        return _save(model, tokenizer, out_dir, provenance, overwrite=overwrite)
    except OSError as exc:  # permissions, a file where a directory should be, disk full
        raise LowbitError(f"could not write {out_dir} ({exc})") from exc


def load_any(spec: str, *, trust_remote_code: bool = False, verify: bool = True) -> tuple[nn.Module, Any]:
    """A lowbit checkpoint directory (its file hashes checked unless ``verify=False``), or
    anything ``load_model`` accepts: (model, tokenizer).

    A model whose repository needs its own code to load is refused unless ``trust_remote_code``."""
    if is_quantized_dir(spec):
        model, tok, _ = load_quantized(spec, trust_remote_code=trust_remote_code, verify=verify)
        return model, tok
    return load_model(spec, trust_remote_code=trust_remote_code)


def bits_per_weight(model: nn.Module) -> float | None:
    """Average bits per weight over the quantized linears (codes + scales + zero points)."""
    total_bits, total = 0.0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.qweight is not None:
            n = m.in_features * m.out_features
            total_bits += m.qweight.bits_per_weight() * n
            total += n
        elif isinstance(m, QuantLinear) and m.bcq is not None:  # BCQ binary codes (LUT-GEMM)
            n = m.in_features * m.out_features
            total_bits += m.bcq.bits_per_weight() * n
            total += n
    return total_bits / total if total else None


def qat(model: str | nn.Module, recipe: str | Path | Recipe | None, data: Any, out: str | Path, **kwargs: Any) -> Any:
    """Quantization-aware training into the checkpoint ``out``: ``lowbit.qat.train`` (its keyword
    arguments: ``config=QATConfig(...)``, ``start``, ``resume``, ``tokenizer``, ...); returns its ``QATResult``."""
    from lowbit.qat import train

    return train(model, recipe, data, out, **kwargs)
