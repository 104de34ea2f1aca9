"""Block sources: where the block runner gets a model's weights, one decoder block at a time.

A source holds ``model``, the transformers causal LM, whose parts that are not loaded sit on the
meta device. The runner calls ``load_outer()`` (embeddings, final norm, output layer, everything not
inside a decoder block), then ``load(prefix)`` / ``release(prefix)`` around each block, and
``float_state(prefix)`` when a step must put the original weights back.

- ``InMemorySource`` wraps a model already in memory (tests, ``api.quantize(model=...)``): loading
  and releasing do nothing, ``float_state`` copies the current tensors.
- ``ShardSource`` reads a directory of safetensors files (one file, or an index and shards): the
  skeleton is built from ``config.json`` on the meta device, the files' headers are read (not their
  data) into an index of every tensor, and that index is checked against the skeleton at once
  (missing tensors, other shapes, extra tensors, damaged headers), so errors come before any work.
  ``load`` reads one module's tensors through a memory map, as float32.
- ``open_source(spec)`` resolves a model spec as ``models.resolve_spec`` does: a directory with
  safetensors, a GGUF file or ``"demo"`` (converted once, streaming, into the cache), a Hub id
  (safetensors and tokenizer files downloaded) or a directory with ``.bin`` weights (loaded whole).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from lowbit import models
from lowbit.archs import get_arch
from lowbit.errors import LowbitError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names -> bytes per element
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class BlockSource(Protocol):
    """What the block runner reads a model through (see the module docstring)."""

    model: nn.Module
    in_memory: bool

    def load(self, prefix: str) -> None:
        """Materialize every parameter and buffer under module ``prefix`` in float32 on CPU."""

    def load_outer(self) -> None:
        """Materialize everything not under the decoder blocks; tied weights stay tied."""

    def release(self, prefix: str) -> None:
        """Put the parameters under ``prefix`` back on the meta device."""

    def float_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The original float tensors under ``prefix``, state-dict names relative to it."""


def _under(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + ".")


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


class InMemorySource:
    """A model already in memory: loading and releasing do nothing; ``float_state`` copies."""

    in_memory = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load(self, prefix: str) -> None:
        pass

    def load_outer(self) -> None:
        pass

    def release(self, prefix: str) -> None:
        pass

    def float_state(self, prefix: str) -> dict[str, torch.Tensor]:
        module = self.model.get_submodule(prefix)
        return {name: t.detach().clone() for name, t in module.state_dict().items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file, from its header: ``offsets`` are absolute bytes."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors file from its header (the data is not read); a damaged header
    or tensors that do not fit the file are a ``LowbitError`` naming the file."""

    def damaged(why: str) -> LowbitError:
        return LowbitError(
            f"{file} is a damaged safetensors file ({why}); it may be truncated or corrupt: copy or download it again"
        )

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise damaged("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or 8 + length > size:
                raise damaged(f"its header claims {length} bytes, the file has {size}")
            raw = f.read(length)
    except OSError as exc:
        raise LowbitError(f"cannot read {file} ({exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise damaged(f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(f"the entry of {name!r} is malformed: {exc!r}") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise damaged(f"the offsets of {name!r} are malformed")
        if end - begin != expected or start + end > size:
            raise damaged(f"{name!r} does not fit: {end - begin} bytes at {begin}, {expected} needed, file {size}")
        entries[name] = TensorEntry(file, dtype, shape, (start + begin, start + end))
    return entries


def index_directory(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors weights in ``directory`` (``model.safetensors``, or the index
    and the shards it names; else every ``*.safetensors`` file), from the headers only."""
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted({directory / f for f in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LowbitError(f"{index_file} is not a valid safetensors index ({exc!r})") from exc
        for f in files:
            if not f.is_file():
                raise LowbitError(f"{index_file} names {f.name}, which is not in {directory}; copy it again")
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LowbitError(f"{directory} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for name, entry in read_header(f).items():
            if name in entries:
                raise LowbitError(f"tensor {name!r} is in both {entries[name].file.name} and {f.name} in {directory}")
            entries[name] = entry
    return entries


def _listing(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class ShardSource:
    """A model directory of safetensors files, read one module at a time (see the module docstring)."""

    in_memory = False

    def __init__(self, directory: str | Path, *, trust_remote_code: bool = False) -> None:
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise LowbitError(f"{self.directory} has no config.json, so it is not a saved Hugging Face model")
        with models.no_remote_code(str(directory), trust_remote_code):
            try:
                config = AutoConfig.from_pretrained(str(self.directory), trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as exc:
                if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
                    raise
                raise LowbitError(f"could not read the model config in {self.directory}: {exc}") from exc
            self.model: nn.Module = models.meta_skeleton(config, trust_remote_code=trust_remote_code)
        self.blocks = get_arch(self.model).blocks
        self.entries = index_directory(self.directory)
        # state-dict name -> the name its tensor has in the files (itself, or a tied alias)
        self.stored: dict[str, str] = {}
        self._check()

    def _check(self) -> None:
        wanted = self.model.state_dict()
        aliases = models.tied_aliases(self.model)
        missing, mismatched = [], []
        for name, t in wanted.items():
            stored = next((n for n in (name, *sorted(aliases.get(name, ()))) if n in self.entries), None)
            if stored is None:
                missing.append(name)
                continue
            self.stored[name] = stored
            if self.entries[stored].shape != tuple(t.shape):
                mismatched.append(f"{stored} is {list(self.entries[stored].shape)}, the config needs {list(t.shape)}")
        config = f"its config.json ({type(self.model).__name__})"
        if missing:
            raise LowbitError(
                f"the weights in {self.directory} lack {len(missing)} tensors that {config} needs: "
                f"{_listing(missing)}; the files belong to another model, or some are missing"
            )
        if mismatched:
            raise LowbitError(
                f"the weights in {self.directory} do not match the shapes {config} describes: "
                f"{_listing(mismatched, 3)}; the files belong to another model"
            )
        ignore = [re.compile(p) for p in getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or ()]
        extra = sorted(n for n in self.entries if n not in wanted and not any(p.search(n) for p in ignore))
        if extra:
            raise LowbitError(
                f"the weights in {self.directory} have {len(extra)} tensors that {config} has no place for: "
                f"{_listing(extra)}; the files belong to another model"
            )

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``{state-dict name: float32 tensor}`` read from the files (tied names read once)."""
        by_file: dict[Path, list[str]] = {}
        for stored in dict.fromkeys(self.stored[n] for n in names):
            by_file.setdefault(self.entries[stored].file, []).append(stored)
        read: dict[str, torch.Tensor] = {}
        for file, stored_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for stored in stored_names:
                        read[stored] = f.get_tensor(stored).to(torch.float32)
            except (SafetensorError, OSError) as exc:
                raise LowbitError(f"could not read {file} ({exc}); it may be damaged: copy it again") from exc
        return {n: read[self.stored[n]] for n in names}

    def _names(self, prefix: str) -> list[str]:
        return [n for n in self.stored if _under(n, prefix)]

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        made: dict[int, nn.Parameter] = {}  # id of the tensor read -> its Parameter (tied names share one)
        for name, tensor in tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if attr in module._parameters:
                old = module._parameters[attr]
                grad = old.requires_grad if old is not None else False
                if id(tensor) not in made:
                    made[id(tensor)] = nn.Parameter(tensor, requires_grad=grad)
                module._parameters[attr] = made[id(tensor)]
            else:
                module._buffers[attr] = tensor

    def load(self, prefix: str) -> None:
        self._assign(self._read(self._names(prefix)))

    def load_outer(self) -> None:
        names = [n for n in self.stored if not _under(n, self.blocks)]
        tensors = self._read(names)
        # a tied weight may have a name inside the blocks too: every place shares the one tensor
        for name, aliases in models.tied_aliases(self.model).items():
            if name in tensors:
                for alias in aliases:
                    tensors.setdefault(alias, tensors[name])
        self._assign(tensors)

    def release(self, prefix: str) -> None:
        module = self.model.get_submodule(prefix)
        made: dict[int, nn.Parameter] = {}
        for sub in module.modules():
            for attr, param in sub._parameters.items():
                if param is not None and not param.is_meta:
                    if id(param) not in made:
                        made[id(param)] = nn.Parameter(
                            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                        )
                    sub._parameters[attr] = made[id(param)]
        for name, buffer in module.named_buffers(remove_duplicate=False):
            full = f"{prefix}.{name}" if prefix else name
            if full in self.stored and buffer is not None and not buffer.is_meta:  # read from the files
                owner, _, attr = name.rpartition(".")
                module.get_submodule(owner)._buffers[attr] = torch.empty_like(buffer, device="meta")

    def float_state(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = self._read(self._names(prefix))
        seen: dict[int, torch.Tensor] = {}
        out = {}
        for name, t in tensors.items():  # tied names get separate copies, as a state dict's clone would
            out[_relative(name, prefix)] = t.clone() if id(t) in seen else t
            seen[id(t)] = t
        return out


def _has_safetensors(directory: Path) -> bool:
    return (directory / INDEX_FILE).is_file() or any(directory.glob("*.safetensors"))


def open_source(spec: str, *, trust_remote_code: bool = False) -> tuple[BlockSource, PreTrainedTokenizerBase]:
    """The block source and tokenizer of a model ``spec`` (what ``models.load_model`` takes)."""
    kind, where = models.resolve_spec(spec)
    if kind == "gguf":
        directory = models.converted_gguf(Path(where))
        return ShardSource(directory), models.load_tokenizer(directory, spec)
    directory = _download(str(where)) if kind == "hub" else Path(where)
    if not _has_safetensors(directory):  # .bin / .pt weights: transformers loads them whole
        model, tokenizer = models.load_model(spec, trust_remote_code=trust_remote_code)
        return InMemorySource(model), tokenizer
    source = ShardSource(directory, trust_remote_code=trust_remote_code)
    return source, models.load_tokenizer(directory, spec, trust_remote_code=trust_remote_code)


def _download(repo_id: str) -> Path:
    """The Hub model ``repo_id``'s config, safetensors and tokenizer files, in the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises many kinds (HTTP, offline, invalid id)
        raise LowbitError(
            f"model {repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"(check the id, your network, and HF_HUB_OFFLINE): {type(exc).__name__}: {exc}"
        ) from exc
