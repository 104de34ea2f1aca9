"""GGUF names and quirks of each family, read from the architecture table (:data:`lowbit.archs.ARCHS`).

The knowledge itself (llama.cpp's architecture name, the HF -> GGUF tensor names, metadata keys,
the q/k row permutation, ``head_dim_key``, ``config_must``) is each table entry's ``gguf`` part, a
:class:`~lowbit.archs.GGUFArch`; this module keeps the names other code imports (``GGUFArch``,
``GGUF_ARCHS``: model_type -> its GGUF part, a live view of the table) and the permutation's code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from lowbit import archs
from lowbit.archs import GGUFArch

__all__ = ["GGUF_ARCHS", "GGUFArch", "arch_for_gguf", "gguf_arch", "head_row_order", "hf_row_order"]


def gguf_arch(model_type: object) -> GGUFArch | None:
    """The GGUF part of ``model_type``'s table entry (None: unknown, or the GGUF exporter does not support it)."""
    entry = archs.ARCHS.get(model_type) if isinstance(model_type, str) else None
    return None if entry is None else entry.gguf


class _GGUFArchs(Mapping[str, GGUFArch]):
    """model_type -> GGUFArch for every family whose table entry has a GGUF part, read at each access."""

    def __getitem__(self, model_type: str) -> GGUFArch:
        arch = gguf_arch(model_type)
        if arch is None:
            raise KeyError(model_type)
        return arch

    def __iter__(self) -> Iterator[str]:
        return iter(archs.families_with("gguf"))

    def __len__(self) -> int:
        return len(archs.families_with("gguf"))

    def __repr__(self) -> str:
        return f"GGUF_ARCHS({dict(self)!r})"


GGUF_ARCHS: Mapping[str, GGUFArch] = _GGUFArchs()


def head_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order of convert_hf_to_gguf's ``permute``: within each head, HF's rows ``i`` (first half)
    and ``half + i`` (second half) become rows ``2i`` and ``2i + 1``."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def hf_row_order(rows: int, n_head: int) -> np.ndarray:
    """The inverse of ``head_row_order``: ``gguf_rows[hf_row_order(...)]`` gives HF's row order back."""
    return np.argsort(head_row_order(rows, n_head))


def arch_for_gguf(gguf_arch: str) -> GGUFArch | None:
    """The table entry whose llama.cpp ``general.architecture`` is ``gguf_arch``, or None."""
    for entry in GGUF_ARCHS.values():
        if entry.arch == gguf_arch:
            return entry
    return None
