"""Where a sweep's jobs run: in this process, one after another, or as Ray tasks.

Both take a job function of ``lowbit.lab.jobs`` and its tasks and yield ``(index, result)`` as
jobs finish. Ray is optional (``pip install 'lowbit[ray]'``); ``address`` None or ``"local"``
starts a local cluster on this machine (shut down again at the end), anything else is passed to
``ray.init(address=...)``: every node must have lowbit and the model's files at the same paths.

Each Ray task asks for the CPU threads the job uses and for memory sized from the model:
``quantize_memory`` for a quantize job (the runner keeps about one block, the embeddings and the
calibration activations), ``eval_memory`` for an evaluate job (the original and the quantized model
both in float32), each capped at what the cluster has so that a task is never unschedulable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lowbit.errors import LowbitError

Job = Callable[[Any, dict[str, Any] | None], dict[str, Any]]
INSTALL_HINT = "install it with pip install 'lowbit[ray]' (or pip install ray), or run without --ray"


class InProcess:
    """Jobs one after another in this process; the evaluate jobs share the loaded original model."""

    name = "in-process"
    address = None

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}

    def map(self, fn: Job, tasks: Sequence[Any], memory: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, task in enumerate(tasks):
            yield i, fn(task, self.cache)

    def close(self) -> None:
        self.cache.clear()


def _call(fn: Job, task: Any) -> dict[str, Any]:  # runs on a Ray worker
    return fn(task, None)


class RayExecutor:
    """Jobs as Ray tasks, as many at once as the cluster's CPUs and memory allow."""

    name = "ray"

    def __init__(self, address: str | None, threads: int, gpus: float = 0.0) -> None:
        try:
            import ray
        except ImportError:
            raise LowbitError(f"--ray needs Ray, which is not installed; {INSTALL_HINT}") from None
        self.ray = ray
        self.address = address if address not in (None, "", "local") else None
        self.started = not ray.is_initialized()
        if self.started:
            try:
                if self.address is None:
                    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise LowbitError(f"could not start or reach the Ray cluster {address or 'local'}: {exc}") from exc
        resources = ray.cluster_resources()
        self.cpus = max(1.0, min(float(threads), float(resources.get("CPU", 1.0))))
        self.max_memory = int(resources.get("memory", 0) * 0.9)
        self.gpus = min(gpus, float(resources.get("GPU", 0.0)))

    def map(self, fn: Job, tasks: Sequence[Any], memory: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        ray = self.ray
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": 0}
        if memory and self.max_memory:
            options["memory"] = min(memory, self.max_memory)
        remote = ray.remote(_call).options(**options)
        pending = {remote.remote(fn, task): i for i, task in enumerate(tasks)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.as_instanceof_cause()
                        if isinstance(cause, LowbitError):
                            raise LowbitError(str(cause)) from None
                        raise
                    yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self.started:
            self.started = False
            self.ray.shutdown()


def quantize_memory(model_bytes: int, n_blocks: int) -> int:
    """Bytes a quantize job may hold: the outer tensors and two blocks' weights, plus the same again
    for activations and temporaries; at least 1 GiB (the interpreter, torch and transformers)."""
    per_block = model_bytes // max(1, n_blocks)
    return max(2**30, 2 * (model_bytes // 4 + 2 * per_block))


def eval_memory(model_bytes: int) -> int:
    """Bytes an evaluate job may hold: both models in float32, and logits; at least 1 GiB."""
    return max(2**30, 3 * model_bytes)
