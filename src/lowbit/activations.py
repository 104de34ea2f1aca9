"""Calibration activations between blocks: captured once, kept in memory up to a budget and on
disk past it, moved to the compute device when a stage reads them.

``capture_calibration_inputs`` records what enters the first block (and the keyword arguments
each block receives); ``Spill`` is the run's memory budget for activations; an
``ActivationStore`` is one list of per-batch hidden states (a block's inputs, its float outputs,
its quantized outputs) that spills to files (read back memory-mapped) once the budget is used.
Spilled tensors come back bit for bit, so a budget changes where activations live, never a number.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from torch import nn

from lowbit.hooks import StopForward, replaced_forwards


class Spill:
    """The activation budget of one run: ``max_bytes`` in memory (None: no limit), the rest in
    files under a temporary directory (in ``where``, default the system's) removed by ``close``."""

    def __init__(self, max_bytes: int | None = None, where: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.in_memory = 0
        self.spilled = 0  # bytes written to disk over the run
        self._where = where
        self._dir: Path | None = None
        self._count = 0

    def admit(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in memory (and count them if so)."""
        if self.max_bytes is not None and self.in_memory + nbytes > self.max_bytes:
            return False
        self.in_memory += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.in_memory -= nbytes

    def path(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lowbit-activations-", dir=self._where))
        self._count += 1
        return self._dir / f"{self._count:08d}.pt"

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class ActivationStore(Sequence[torch.Tensor]):
    """Per-batch activations (B, T, H), held on the CPU in memory while ``spill`` admits them and
    in files past that; ``store[i]`` returns batch ``i`` on ``device``."""

    def __init__(self, spill: Spill, device: torch.device | str = "cpu") -> None:
        self.spill = spill
        self.device = torch.device(device)
        self._items: list[torch.Tensor | Path] = []
        self._held = 0

    @classmethod
    def of(cls, tensors: list[torch.Tensor], spill: Spill, device: torch.device | str = "cpu") -> ActivationStore:
        store = cls(spill, device)
        for t in tensors:
            store.append(t)
        return store

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.spill.admit(nbytes):
            self._items.append(t.to("cpu") if t.device.type != "cpu" else t)
            self._held += nbytes
        else:
            path = self.spill.path()
            torch.save(t.to("cpu").contiguous(), path)
            self.spill.spilled += nbytes
            self._items.append(path)

    @property
    def on_disk(self) -> int:
        return sum(isinstance(x, Path) for x in self._items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...
    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        t = torch.load(item, mmap=True, weights_only=True) if isinstance(item, Path) else item
        return t.to(self.device) if t.device != self.device else t

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def on_host(self) -> list[torch.Tensor]:
        """Every batch as stored, on the CPU (spilled ones memory-mapped), not moved to ``device``:
        for writing them out without a round trip through the GPU."""
        return [torch.load(t, mmap=True, weights_only=True) if isinstance(t, Path) else t for t in self._items]

    def close(self) -> None:
        """Give the memory back to the budget and delete this store's files."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.spill.release(self._held)
        self._held = 0
        self._items = []


class BlockInputs(Sequence[tuple[torch.Tensor, dict[str, Any]]]):
    """A block's calibration inputs as stages read them: per batch (hidden states, keyword args)."""

    def __init__(self, hidden: Sequence[torch.Tensor], kwargs: list[dict[str, Any]]) -> None:
        if len(hidden) != len(kwargs):
            raise ValueError(f"{len(hidden)} batches of hidden states but {len(kwargs)} of keyword arguments")
        self.hidden, self.kwargs = hidden, kwargs

    def __len__(self) -> int:
        return len(self.kwargs)

    @overload
    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[torch.Tensor, dict[str, Any]]]: ...
    def __getitem__(
        self, i: int | slice
    ) -> tuple[torch.Tensor, dict[str, Any]] | list[tuple[torch.Tensor, dict[str, Any]]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.hidden[i], self.kwargs[i]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for i in range(len(self)):
            yield self[i]


def kwargs_to(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A block's keyword arguments with every tensor (also inside tuples) on ``device``."""

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def capture_calibration_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Hidden states entering the first block (per batch) and the keyword arguments every block
    receives (per block, per batch).

    Blocks of one model may receive different keyword arguments (Gemma 2/3, Qwen2 with sliding
    layers: a sliding-window or a full causal mask, local or global rotary embeddings), so each
    block's are recorded. Every block is bypassed while recording (it returns its input), so no
    block computes anything and blocks whose weights are not loaded are never touched; the pass
    stops at the last block.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]

    def bypass(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kw: Any) -> Any:
            rest = dict(kw)
            h = args[0] if args else rest.pop("hidden_states")
            kwargs[i].append(rest)
            if i == 0:
                hidden.append(h.detach())
            if i == len(blocks) - 1:
                raise StopForward
            return h

        return forward

    with replaced_forwards(blocks, bypass):
        for batch in calib.split(batch_size):
            with contextlib.suppress(StopForward):
                model(input_ids=batch, use_cache=False)
    return hidden, kwargs
