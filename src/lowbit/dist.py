"""Data-parallel calibration on ``torch.distributed``.

Calibration samples are split across ranks (:func:`split_samples`); every rank runs the same
block-by-block code on its share, and every accumulated statistic (Hessians, observer ranges,
KV ranges) is all-reduced before it is read, so every rank takes the same decisions; rank 0
writes the output. Without an initialized process group every function here is the identity
(world 1, rank 0), so single-process code calls them unconditionally.

Two ways to get ranks: :func:`run_workers` spawns ``n`` local processes (gloo on CPU) and
returns rank 0's result; under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` set),
:func:`init_from_env` joins the group torchrun describes.

Collectives are called by every rank in the same order; a rank that skips one makes the others
wait until the backend's timeout. The accumulators' ``reduce()`` methods are collectives too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue as queue_mod
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from lowbit.errors import LowbitError

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world() -> int:
    """Number of ranks (1 when torch.distributed is not initialized)."""
    return tdist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialized)."""
    return tdist.get_rank() if _active() else 0


def is_main() -> bool:
    """True on rank 0, the rank that writes outputs and prints (and in a single process)."""
    return rank() == 0


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where the backend wants ``t``: CUDA tensors stay on CUDA with NCCL, gloo/MPI take CPU."""
    backend = str(tdist.get_backend()).lower()
    has_nccl = "nccl" in backend
    if t.is_cuda and has_nccl:
        return t.device
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _to_comm(t: torch.Tensor) -> torch.Tensor:
    dev = _comm_device(t)
    if t.device == dev and t.is_contiguous():
        return t
    return t.to(dev).contiguous()


def _all_reduce_(t: torch.Tensor, op: str) -> torch.Tensor:
    if not _active() or world() == 1:
        return t
    buf = _to_comm(t)
    tdist.all_reduce(buf, op=getattr(tdist.ReduceOp, _OPS[op]))
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (returns ``t``); a no-op in a single process."""
    return _all_reduce_(t, "sum")


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``t`` over ranks, in place (returns ``t``); exact."""
    return _all_reduce_(t, "max")


def all_reduce_min_(t: torch.Tensor) -> torch.Tensor:
    """Elementwise min of ``t`` over ranks, in place (returns ``t``); exact."""
    return _all_reduce_(t, "min")


def all_reduce_scalar(x: float, op: str = "sum") -> float:
    """``x`` reduced over ranks with ``op`` ("sum", "max" or "min"), in float64."""
    if op not in _OPS:
        raise LowbitError(f"unknown reduce op {op!r}; choose one of {sorted(_OPS)}")
    t = torch.tensor(float(x), dtype=torch.float64)
    return float(_all_reduce_(t, op))


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in rank order, on ``t``'s device."""
    if not _active() or world() == 1:
        return [t]
    buf = _to_comm(t)
    out = [torch.empty_like(buf) for _ in range(world())]
    tdist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order; lengths may differ between ranks
    (the other dimensions and the dtype may not)."""
    if not _active() or world() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    sizes = [int(s) for s in all_gather(n)]
    longest = max(sizes)
    padded = t
    if t.shape[0] < longest:
        padded = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (any picklable object); ``obj`` itself when
    not distributed. For decisions made on one rank (e.g. a search's choice)."""
    if not _active() or world() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def share_bounds(n: int, world_size: int, rank_: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank_``'s contiguous share of ``n`` items over ``world_size``
    ranks: the first ``n % world_size`` ranks get one item more."""
    if n < world_size:
        raise LowbitError(
            f"{n} calibration sample{'s' if n != 1 else ''} cannot be split across {world_size} workers: "
            f"at least {world_size} samples are needed (one per worker); ask for more samples or fewer workers"
        )
    base, extra = divmod(n, world_size)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


def split_samples(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration ids ``(n, T)`` (shares differ by at most
    one row; concatenated in rank order they are ``ids``). All of ``ids`` when not distributed."""
    start, stop = share_bounds(ids.shape[0], world(), rank())
    return ids[start:stop]


def init_from_env(backend: str | None = None, device: str | torch.device | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Returns whether torch.distributed is
    initialized afterwards (False when those variables are not set: a single process).

    ``backend`` defaults to "nccl" when CUDA is available and ``device`` is a CUDA device (or
    not given), else "gloo". With NCCL the process's CUDA device is ``LOCAL_RANK``.
    """
    if _active():
        return True
    if not all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return False
    if backend is None:
        on_cuda = device is None or torch.device(device).type == "cuda"
        backend = "nccl" if torch.cuda.is_available() and on_cuda else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker(
    rank_: int,
    n: int,
    port: int,
    threads: int | None,
    results: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Body of one spawned worker: init the group, run ``fn``, report on ``results``."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        tdist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank_,
            world_size=n,
            timeout=datetime.timedelta(minutes=30),
        )
        value = fn(*args, **kwargs)
        # pickled here, by value: an unpicklable result is this rank's error, and no tensor is
        # shared through memory that disappears with this process
        results.put((rank_, "ok", pickle.dumps(value if rank_ == 0 else None), ""))
    except BaseException as e:  # reported to the parent, which re-raises it
        with contextlib.suppress(Exception):  # if the queue itself broke, the parent sees the exit code
            results.put((rank_, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
            # flushed before the group goes down, so this report reaches the parent before the
            # errors of the ranks that lose their connection to this one
            results.close()
            results.join_thread()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def run_workers(n: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``n`` local processes joined in one gloo process group and
    return rank 0's return value.

    Processes are spawned (not forked), so ``fn``, its arguments and rank 0's result must be
    picklable, and ``fn`` importable by name (a module-level function). Each worker's torch
    threads are limited to ``max(1, os.cpu_count() // n)`` unless ``OMP_NUM_THREADS`` is set (or
    ``fn`` sets its own). ``n == 1`` calls ``fn`` here, without a process group.

    The first worker to fail ends the run: the others are terminated and a ``LowbitError``
    names the rank, the original error and its traceback. Workers are always joined (or
    terminated) before this returns.
    """
    if not isinstance(n, int) or n < 1:
        raise LowbitError(f"the number of workers must be a positive integer, got {n!r}")
    if n == 1:
        return fn(*args, **kwargs)
    if _active():
        raise LowbitError("run_workers was called inside a process group; call fn directly there")
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = []
    try:
        for r in range(n):
            p = ctx.Process(
                target=_worker,
                args=(r, n, port, threads, results, fn, args, kwargs),
                name=f"lowbit-worker-{r}",
                daemon=True,
            )
            try:
                p.start()
            except Exception as e:
                raise LowbitError(
                    f"could not start worker {r}: {type(e).__name__}: {e} "
                    "(fn and its arguments must be picklable; fn must be a module-level function)"
                ) from e
            procs.append(p)
        return _collect(procs, results)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        results.join_thread()


def _collect(procs: list[Any], results: Any) -> Any:
    """Wait for every worker's report; rank 0's value, or a LowbitError for the first failure."""
    n = len(procs)
    pending = set(range(n))
    value: Any = None
    while pending:
        try:
            msg = results.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [r for r in sorted(pending) if procs[r].exitcode is not None]
            if not dead:
                continue
            try:  # a worker may have reported just before exiting
                msg = results.get(timeout=1.0)
            except queue_mod.Empty:
                r = dead[0]
                raise LowbitError(
                    f"worker {r} of {n} died without reporting (exit code {procs[r].exitcode}; "
                    "killed for memory, or a crash in native code?)"
                ) from None
        r, status, payload, tb = msg
        if status == "error":
            raise LowbitError(f"worker {r} of {n} failed: {payload}\n{tb.rstrip()}")
        if r == 0:
            value = pickle.loads(payload)
        pending.discard(r)
    return value
