"""One quantization job, from a model spec to a checkpoint directory, streamed block by block.

``run_job`` opens the model as a block source (``lowbit.source``: its blocks are read from the
safetensors shards when processed), draws the calibration samples, and runs the block runner
(``lowbit.pipeline.run``) into a sink (``lowbit.sink``) that writes each block as it is finished.
With ``resume`` an interrupted job continues from its last finished block; with ``workers`` > 1
the calibration samples are split over that many processes (``lowbit.dist``) and rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from lowbit import defaults, dist
from lowbit.algorithms import build_algorithm
from lowbit.checkpoint import outer_tensors
from lowbit.data import calibration_samples
from lowbit.errors import LowbitError
from lowbit.pipeline import RunOptions, run
from lowbit.runreport import RunReport
from lowbit.scheme import Recipe, to_dict
from lowbit.sink import CheckpointSink
from lowbit.source import open_source
from lowbit.stages import needs_data


@dataclasses.dataclass
class Job:
    model: str  # Hub id, local directory, .gguf or "demo"
    recipe: Recipe
    out: Path
    calib: str = "demo"
    samples: int = defaults.CALIB_SAMPLES
    seq_len: int = defaults.CALIB_SEQ_LEN
    seed: int = defaults.SEED
    options: RunOptions = dataclasses.field(default_factory=RunOptions)
    overwrite: bool = False
    resume: bool = False
    trust_remote_code: bool = False


def run_job(job: Job, workers: int = 1) -> RunReport:
    """Quantize ``job.model`` into ``job.out``; returns the run report (rank 0's with workers)."""
    if workers > 1:
        if job.resume:
            raise LowbitError(
                "--resume continues from the activations one process saved; resume with one worker "
                "(drop --workers), or start again with --overwrite"
            )
        return dist.run_workers(workers, run_job, job)
    source, tokenizer = open_source(job.model, trust_remote_code=job.trust_remote_code)
    if job.options.measure or needs_data(job.recipe, [build_algorithm(s.name, s.params) for s in job.recipe.steps]):
        calib = calibration_samples(tokenizer, job.calib, n_samples=job.samples, seq_len=job.seq_len, seed=job.seed)
    else:  # a data-free recipe: no text is read at all
        calib = torch.zeros((0, job.seq_len), dtype=torch.int64)
    local = dist.split_samples(calib) if dist.world() > 1 and len(calib) else calib
    sink = None
    if dist.is_main():
        sink = CheckpointSink(job.out, overwrite=job.overwrite, resume=job.resume, fingerprint=fingerprint(job, calib))
    try:
        report = run(source, job.recipe, local, job.options, sink)
        report.n_samples = int(calib.shape[0])
        if sink is not None:
            source.load_outer()
            outer, outer_layers = outer_tensors(source.model)
            meta = report.provenance(job.model)
            sink.finish(source.model.config, tokenizer, outer, meta, outer_layers=outer_layers)
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    return report


def fingerprint(job: Job, calib: torch.Tensor) -> dict[str, Any]:
    """What must be equal for a partial run to be continued: the recipe, the model, the
    calibration ids and the options that change numbers."""
    return {
        "recipe": to_dict(job.recipe),
        "model": job.model,
        "calibration": hashlib.sha256(calib.to(torch.int64).numpy().tobytes()).hexdigest(),
        "calibration_shape": list(calib.shape),
        "batch_size": job.options.batch_size,
        "measure": job.options.measure,
        "threads": torch.get_num_threads(),
    }
