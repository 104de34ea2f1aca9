"""Files written so that a kill at any moment leaves either the old or the new file (temp name,
fsync, rename, fsync the directory), and run fingerprints compared field by field: what the
streaming sink (``lowbit.sink``) builds a resumable checkpoint from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# one key only: safetensors writes metadata in hash-map order, so two keys make the bytes (and the
# recorded SHA-256) differ from run to run; the format version is in lowbit.json and the index
_FILE_METADATA = {"format": "pt"}


# ---- durable writes ------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is copied
    (safetensors refuses shared storage, e.g. hidden states that are chunks of one tensor)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = t
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file durably: temp name, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=_FILE_METADATA)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


# ---- fingerprints --------------------------------------------------------------------------------


def normalized(value: Any, what: str) -> Any:
    """``value`` as JSON reads it back (tuples become lists, keys strings), so equal runs compare
    equal; key order is kept (``lowbit.json`` keeps the provenance as given)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-able: {exc}") from None


def short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Lines naming each place where two JSON values differ (``recipe.steps[0].name: ...``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else key
            if key not in old:
                out.append(f"{where}: absent in the partial run, {short(new[key])} now")
            elif key not in new:
                out.append(f"{where}: {short(old[key])} in the partial run, absent now")
            else:
                out += differences(old[key], new[key], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [line for i, (a, b) in pairs for line in differences(a, b, f"{path}[{i}]")]
    if old != new:
        return [f"{path or 'fingerprint'}: {short(old)} in the partial run, {short(new)} now"]
    return []
