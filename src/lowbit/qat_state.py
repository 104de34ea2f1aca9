"""What a QAT run needs to continue exactly: the order of its training windows and its saved state.

Windows: the training text's token stream cut into consecutive windows of ``seq_len`` tokens; each
epoch visits all of them in a permutation drawn from ``(seed, epoch)``, so the batch of any step
is a function of the number of windows consumed so far (the *data position*) and nothing else.

State: one file ``state.pt`` in ``.NAME.qat`` next to the output directory ``NAME``, holding the
step, the data position, the trained tensors (weights and LSQ scales), the optimizer's state, the
RNG states and the run's fingerprint. It is written to a temporary name, fsync'd and renamed
(then the directory fsync'd), so a kill leaves the previous state or the new one, never half.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowbit.durable import differences, fsync
from lowbit.errors import LowbitError

STATE_FILE = "state.pt"


def state_dir(out: str | Path) -> Path:
    """Where a QAT run into ``out`` keeps its resumable state: ``.NAME.qat`` next to it."""
    out = Path(out)
    return out.parent / f".{out.name}.qat"


def cut_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n, seq_len) consecutive, non-overlapping windows of the 1-D token ``stream`` (the tail that
    does not fill a window is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def epoch_order(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """(n_windows,) int64: the permutation of the windows in ``epoch`` (seeded by ``seed`` and ``epoch``)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_windows, generator=gen)


def batch_indices(position: int, batch_size: int, n_windows: int, seed: int) -> list[int]:
    """The windows at data positions ``position .. position + batch_size - 1`` of the endless
    sequence of epochs (an epoch boundary may fall inside a batch)."""
    out: list[int] = []
    orders: dict[int, torch.Tensor] = {}
    for p in range(position, position + batch_size):
        epoch, offset = divmod(p, n_windows)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_windows, seed, epoch)
        out.append(int(orders[epoch][offset]))
    return out


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and, when present, CUDA) RNG states."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``directory/state.pt`` durably (temp name, fsync, rename, fsync the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    tmp = path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LowbitError(f"could not save the QAT state to {path} ({exc})") from exc


def load_state(directory: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The saved state of the run in ``directory``; refused if its fingerprint differs from ``fingerprint``."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise LowbitError(
            f"--resume: there is no QAT run to resume ({path} does not exist); run the same command without --resume"
        )
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: torch raises several kinds
        raise LowbitError(f"{path} is damaged ({exc}); start again with --overwrite instead of --resume") from None
    diff = differences(state.get("fingerprint"), fingerprint)
    if diff:
        raise LowbitError(
            "--resume: the saved QAT run differs from this command: "
            + "; ".join(diff[:5])
            + "; resume with the same model, recipe, data and settings, or start again with --overwrite"
        )
    return state
