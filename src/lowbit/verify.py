"""Checks that a checkpoint is what was written and that its numbers can be used.

Two independent kinds of check, as small pure functions:

- file hashes: the checkpoint writer (``lowbit.sink``) records the SHA-256 of every file it
  writes (every block shard, the outer shard, the index, config and tokenizer; not
  ``lowbit.json``, which holds the hashes) under ``"sha256"`` in ``lowbit.json``; a shard's hash
  is taken when the shard is written, so finishing a long run reads no shard again.
  ``load_quantized`` recomputes them (``verify=False`` / ``--no-verify`` skips this, for a
  checkpoint edited on purpose) and refuses a weight file the table does not list
  (``check_listed``: an edited ``lowbit.json`` cannot leave a shard unchecked). Checkpoints
  written before hashes existed have no ``"sha256"`` entry and are accepted as they are: there is
  nothing to compare against. Other files in the directory that are not listed (markers, locks)
  are ignored.
- values, always (hashes only say a file is unchanged, not that it was right when written):
  scales finite and > 0 (a group of zeros gets scale 1, so 0 never occurs), zero points
  integral and inside the format's code range, float formats' codes finite grid values, and
  every float tensor (norms, embeddings, float layers, OWQ columns) finite.

Every failure is a ``LowbitError`` that names the file or the tensor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import Format
from lowbit.kvcache import KVQuantizer
from lowbit.modules import QuantLinear
from lowbit.qweight import QuantizedWeight

HASH_KEY = "sha256"
CHUNK = 1 << 22  # 4 MiB: files can be gigabytes

_CHECK_HASHES: ContextVar[bool] = ContextVar("lowbit_check_hashes", default=True)


@contextmanager
def hashes_unchecked() -> Iterator[None]:
    """Inside, ``load_quantized`` skips the file hashes, however deep the call (``lowbit bench
    --no-verify`` loads through code that takes no ``verify`` argument)."""
    token = _CHECK_HASHES.set(False)
    try:
        yield
    finally:
        _CHECK_HASHES.reset(token)


def hashes_checked() -> bool:
    return _CHECK_HASHES.get()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path) -> set[str]:
    """Every file under ``root``, as POSIX paths relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def hash_files(root: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of the named files under ``root``, sorted by name."""
    return {name: file_sha256(root / name) for name in sorted(names)}


def _damaged(path: Path, what: str) -> LowbitError:
    return LowbitError(
        f"{path} {what}: the checkpoint is damaged or incomplete; copy it again or quantize again "
        "(or pass --no-verify / verify=False if you edited it on purpose)"
    )


def verify_hashes(root: Path, meta: dict[str, Any]) -> None:
    """Compare the files under ``root`` with the hashes in ``meta``; nothing to do without any."""
    recorded = meta.get(HASH_KEY)
    if recorded is None:
        return  # written before lowbit recorded hashes
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise _damaged(root / "lowbit.json", f"has a malformed {HASH_KEY!r} table")
    for name, want in recorded.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise _damaged(root / "lowbit.json", f"lists a file outside the checkpoint ({name!r})")
        path = root / name
        if not path.is_file():
            raise _damaged(path, "is missing")
        if file_sha256(path) != want:
            raise _damaged(path, "does not match the SHA-256 recorded in lowbit.json")


def check_listed(root: Path, names: Iterable[str], meta: dict[str, Any]) -> None:
    """Every weight file the checkpoint reads (``names``, relative to ``root``) has a recorded
    hash, when the checkpoint records hashes at all (``verify_hashes`` then compared them)."""
    recorded = meta.get(HASH_KEY)
    if not isinstance(recorded, dict):
        return
    for name in names:
        if name not in recorded:
            raise _damaged(root / name, f"has no SHA-256 in lowbit.json, which lists {len(recorded)} other files")


def check_config_file(path: Path) -> None:
    """``config.json`` must be a JSON object with a ``model_type`` (what transformers needs)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{path} is missing; the checkpoint is incomplete, copy it again or quantize again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(f"{path} is not valid JSON ({exc}); restore the model's config.json") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise LowbitError(f"{path} has no 'model_type', so it is not a transformers model config; restore it")


# ---- values ------------------------------------------------------------------------------------


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum())


def _n(count: int, what: str) -> str:
    """``1 NaN value``, ``3 NaN values``."""
    return f"{count} {what}" + ("" if count == 1 else "s")


def check_finite(name: str, t: torch.Tensor) -> None:
    """A float tensor has no NaN and no infinity."""
    if not t.is_floating_point() or t.is_meta:
        return
    if bool(torch.isfinite(t).all()):
        return
    nan, inf = _count(torch.isnan(t)), _count(torch.isinf(t))
    what = " and ".join(s for s in (_n(nan, "NaN value") if nan else "", _n(inf, "infinite value") if inf else "") if s)
    raise LowbitError(f"{name} has {what}")


def check_scale(name: str, scale: torch.Tensor) -> None:
    """Scales are finite and positive."""
    check_finite(name, scale)
    bad = _count(scale <= 0)
    if bad:
        raise LowbitError(f"{name} has {_n(bad, 'value')} <= 0 (scales must be positive)")


def check_zero_point(name: str, zp: torch.Tensor, fmt: Format) -> None:
    """Zero points are finite integers inside ``[qmin, qmax]`` of the format."""
    z = zp.to(torch.float64)
    check_finite(name, z)
    bad = _count((z < fmt.qmin) | (z > fmt.qmax) | (z != torch.round(z)))
    if bad:
        raise LowbitError(f"{name} has {_n(bad, 'value')} outside the {fmt.name} code range {fmt.qmin}..{fmt.qmax}")


def check_codes(name: str, codes: torch.Tensor, fmt: Format) -> None:
    """Codes are values of the format: integer codes always are, float bit patterns may be NaN/Inf."""
    if not fmt.is_float:
        return
    bad = _count(torch.isnan(fmt.from_codes(codes)))
    if bad:
        raise LowbitError(f"{name} has {_n(bad, 'code')} that are not finite {fmt.name} values (NaN/Inf bit patterns)")


def check_qweight(name: str, qw: QuantizedWeight) -> None:
    """Every number a quantized weight is made of; ``name`` is the layer's."""
    check_codes(f"{name}.weight_packed", qw.codes, qw.spec.fmt)
    check_scale(f"{name}.weight_scale", qw.scale)
    check_zero_point(f"{name}.weight_zero_point", qw.zero_point, qw.spec.fmt)
    if qw.outlier_weight is not None:
        check_finite(f"{name}.weight_outlier", qw.outlier_weight)
    for part, factor in (("u", qw.lorc_u), ("v", qw.lorc_v)):
        if factor is not None:
            check_finite(f"{name}.weight_lorc_{part}", factor)


def check_qparams(name: str, scale: torch.Tensor, zp: torch.Tensor, fmt: Format) -> None:
    """Static activation or KV-cache parameters: ``name`` is the prefix (``...input``, ``...k``)."""
    check_scale(f"{name}_scale", scale)
    check_zero_point(f"{name}_zero_point", zp, fmt)


def check_model(model: nn.Module) -> None:
    """Every quantization parameter of an in-memory model, then every other float tensor finite
    (a quantized layer's dequantized weight is not swept again: it is made of what was checked)."""
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.qweight is not None:
                check_qweight(name, m.qweight)
            if m.act is not None and m.act.scale is not None and m.act.zero_point is not None:
                check_qparams(f"{name}.input", m.act.scale, m.act.zero_point, m.act.spec.fmt)
            own = {"bias": m.bias} if m.qweight is not None else {"weight": m.weight, "bias": m.bias}
        elif isinstance(m, KVQuantizer):
            continue  # checked with its attention module below
        else:
            own = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        kvq = getattr(m, "lowbit_kv", None)
        if isinstance(kvq, KVQuantizer):
            for kind, (scale, zp) in kvq.qparams.items():
                check_qparams(f"{name}.{kind}", scale, zp, kvq.spec.fmt)
        for key, value in own.items():
            if isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() not in seen:  # tied: once
                seen.add(value.data_ptr())
                check_finite(f"{name}.{key}" if name else key, value)
