"""The jobs of a sweep: quantize one recipe into a checkpoint, evaluate one checkpoint against the
original. Each is a plain function of a plain task (picklable: it runs in this process or as a Ray
task) and returns plain data, so both executors give the same results.

A quantize job leaves ``DIR/checkpoints/<name>`` and its record ``DIR/jobs/<name>.json`` (the
fingerprint it was made from and the SHA-256 of the checkpoint's ``lowbit.json``); the sweep
reuses the checkpoint when a later run's fingerprint equals the record's. An evaluate job stores
its result in the checkpoint (``lowbit.eval.store``), where the sweep finds it next time.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.durable import normalized, write_json
from lowbit.eval.store import checkpoint_id, load_result, model_identity, save_result


@dataclass(frozen=True)
class QuantizeTask:
    name: str
    model: str
    recipe: dict[str, Any]  # Recipe.to_dict()
    ckpt: str  # absolute checkpoint directory
    record: str  # absolute path of the job record
    fingerprint: dict[str, Any]
    calib: str
    samples: int
    seq_len: int
    seed: int
    batch_size: int
    max_memory: int | None
    device: str
    threads: int
    trust_remote_code: bool = False


@dataclass(frozen=True)
class EvalTask:
    name: str
    model: str  # the original, the baseline
    ckpt: str
    windows: torch.Tensor  # (n_windows, seq_len) int64 token ids
    settings: dict[str, Any]  # lowbit.eval.store.eval_settings(...)
    batch_size: int
    threads: int
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # generation similarity (lowbit.eval.similarity): the prompts, new tokens per continuation and
    # the sentence-embedding model; no prompts, no generations
    prompts: tuple[str, ...] = ()
    gen_tokens: int = 32
    embedding_model: str | None = None


def model_fingerprint(spec: str) -> dict[str, Any]:
    """What identifies the model's files without reading them: the spec (a local path made
    absolute) and, for a local file or directory, each file's name, size and modification time
    (a model changed in place is a new model; a copy is too, which only costs a new quantization)."""
    path = Path(spec).expanduser()
    files: list[list[Any]] = []
    if path.is_file():
        st = path.stat()
        files.append([path.name, st.st_size, st.st_mtime_ns])
    elif path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append([f.name, st.st_size, st.st_mtime_ns])
    return {"spec": model_identity(spec), "files": files}


def ids_sha256(ids: torch.Tensor | None) -> str | None:
    """SHA-256 of token ids as int64 bytes; None for no ids (a data-free recipe)."""
    if ids is None:
        return None
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def quantize_fingerprint(
    recipe: dict[str, Any], model: dict[str, Any], calib_sha256: str | None, task_options: dict[str, Any]
) -> dict[str, Any]:
    """What must be equal for a checkpoint to be reused: the recipe, the model's files, the
    calibration ids (None when the recipe reads no data) and the options that change numbers
    (samples, seq_len, seed, batch size, device; only the device for a data-free recipe). Thread
    counts are left out: they move results only in the last bits, not enough to quantize again."""
    return normalized(
        {"recipe": recipe, "model": model, "calibration_sha256": calib_sha256, **task_options}, "the fingerprint"
    )


def reusable(task: QuantizeTask) -> dict[str, Any] | None:
    """The job record of a finished checkpoint equal to what ``task`` would make, or None."""
    import json

    try:
        record = json.loads(Path(task.record).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != task.fingerprint:
        return None
    ident = checkpoint_id(task.ckpt)
    return record if ident is not None and record.get("checkpoint") == ident else None


def quantize_job(task: QuantizeTask, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize ``task.recipe`` into ``task.ckpt`` (continuing a partial run of the same job) and
    write the job record. Returns the record."""
    from lowbit.api import quantize_to
    from lowbit.outdir import partial_dir
    from lowbit.recipes import recipe_from_dict

    torch.set_num_threads(task.threads)
    Path(task.ckpt).parent.mkdir(parents=True, exist_ok=True)
    Path(task.record).parent.mkdir(parents=True, exist_ok=True)
    Path(task.record).unlink(missing_ok=True)  # a record never outlives the checkpoint it names
    report = quantize_to(
        task.model,
        recipe_from_dict(task.recipe),
        task.ckpt,
        calib=task.calib,
        samples=task.samples,
        seq_len=task.seq_len,
        seed=task.seed,
        batch_size=task.batch_size,
        max_memory=task.max_memory,
        device=task.device,
        resume=partial_dir(task.ckpt).is_dir(),  # an interrupted sweep continues the block it was at
        overwrite=True,  # a checkpoint lowbit wrote under this name for another fingerprint
        progress=False,
        trust_remote_code=task.trust_remote_code,
    )
    record = {
        "fingerprint": task.fingerprint,
        "checkpoint": checkpoint_id(task.ckpt),
        "seconds": report.seconds,
        "host": socket.gethostname(),
    }
    write_json(Path(task.record), record)
    return record


def generation_metrics(original: Any, model: Any, tokenizer: Any, task: EvalTask) -> dict[str, Any]:
    """ROUGE-L (and embedding cosine, with an embedding model) of the quantized model's greedy and
    sampled continuations against the original's, as flat metrics the tables and recoveries read."""
    from lowbit.eval.similarity import generation_similarity

    sim = generation_similarity(
        original,
        model,
        tokenizer,
        list(task.prompts),
        task.gen_tokens,
        embedding_model=task.embedding_model,
        progress=False,
    )
    out: dict[str, Any] = {}
    for mode, suffix in (("greedy", ""), ("sampled", "_sampled")):
        out[f"rouge_l{suffix}"] = sim[mode]["rouge_l"]
        out[f"exact_match{suffix}"] = sim[mode]["exact_match"]
        if sim[mode]["embedding_cosine"] is not None:
            out[f"embedding_similarity{suffix}"] = sim[mode]["embedding_cosine"]
    return out


def evaluate_job(task: EvalTask, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint against the original on ``task.windows`` and store the result in
    the checkpoint; a result already stored for these settings is returned as it is.
    ``cache`` (in-process runs) keeps the original model loaded across jobs."""
    from lowbit.api import evaluate, load_model, load_quantized

    stored = load_result(task.ckpt, task.settings)
    if stored is not None:
        return {"metrics": stored["metrics"], "reused": True, "host": socket.gethostname()}
    torch.set_num_threads(task.threads)
    model, tokenizer, _ = load_quantized(task.ckpt, trust_remote_code=task.trust_remote_code)
    key = f"original:{task.model}"
    if cache is not None and key in cache:
        original = cache[key]
    else:
        original, _ = load_model(task.model, trust_remote_code=task.trust_remote_code)
        if cache is not None:
            cache[key] = original
    result = evaluate(model, task.windows, baseline=original, batch_size=task.batch_size, progress=False)
    metrics = result.to_dict()
    if task.prompts:
        metrics.update(generation_metrics(original, model, tokenizer, task))
    save_result(task.ckpt, task.settings, metrics)
    return {"metrics": metrics, "reused": False, "host": socket.gethostname()}
