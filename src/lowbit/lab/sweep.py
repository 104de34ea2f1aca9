"""``compare``: quantize a model with several recipes, evaluate each against the original, and
write the results, tables, plots and the HTML report into one directory.

Layout of ``out``::

    checkpoints/<name>/     one lowbit checkpoint per recipe (its evaluations in eval/<key>.json)
    jobs/<name>.json        what each checkpoint was made from (reused when equal)
    results.json            everything below, and the job list (quantized or reused)
    results.csv, results.md one row per recipe
    plots/*.png             quality against bits per weight, error per layer, quantize time, decode speed
    report.html             all of it in one file, plots embedded

``results.json`` holds the numbers (which are the same whether the jobs ran here or on Ray) apart
from two parts that describe the run: ``timings`` (seconds, tokens/s) and ``host`` (machine,
executor, paths).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import lowbit.lab.jobs as jobs
import lowbit.lab.results as results
from lowbit import defaults
from lowbit.errors import LowbitError
from lowbit.lab.files import prepare_dir, write_bytes, write_text
from lowbit.lab.ray_jobs import InProcess, RayExecutor, eval_memory, quantize_memory
from lowbit.scheme import Recipe

RESULTS_FORMAT = 1


def _recipes(presets: Sequence[str], recipe_files: Sequence[str | Path], group_size: int | None) -> list[Recipe]:
    """The recipes to compare; ``group_size`` regroups those whose weights are in groups (per-channel
    and per-tensor recipes are left as they are, unlike ``lowbit quantize --group-size``: a sweep
    usually mixes both)."""
    from lowbit.api import resolve_recipe
    from lowbit.recipes import load_recipe
    from lowbit.scheme import with_group_size

    chosen = [resolve_recipe(p) for p in presets] + [load_recipe(str(f)) for f in recipe_files]
    if group_size:
        chosen = [
            with_group_size(r, group_size) if r.scheme.weights and r.scheme.weights.granularity == "group" else r
            for r in chosen
        ]
    if not chosen:
        raise LowbitError("nothing to compare: give --presets (e.g. w4a16-rtn,w4a16) and/or --recipes files")
    names = [r.name for r in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LowbitError(f"recipe names must differ (each names a checkpoint): {', '.join(twice)} appear twice")
    return chosen


def _check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LowbitError(
            "lowbit compare draws its plots with matplotlib, which is not installed; pip install 'lowbit[lab]'"
        ) from None


def _prompts(generations: str | None, eval_source: str) -> list[str]:
    """The generation prompts: none, those of a file, or ``demo``'s drawn from the evaluation text."""
    from lowbit.eval.similarity import default_prompts, load_prompts

    if not generations:
        return []
    return default_prompts(eval_source) if generations == "demo" else load_prompts(generations)


def _sha256_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def compare(
    model: str,
    presets: Sequence[str] = (),
    recipes: Sequence[str | Path] = (),
    out: str | Path = "lowbit-compare",
    *,
    calib: str = "demo",
    eval_data: str | None = None,
    samples: int = defaults.CALIB_SAMPLES,
    seq_len: int = defaults.CALIB_SEQ_LEN,
    seed: int = defaults.SEED,
    eval_windows: int = defaults.EVAL_WINDOWS,
    eval_seq_len: int = defaults.EVAL_SEQ_LEN,
    batch_size: int = defaults.BATCH_SIZE,
    group_size: int | None = None,
    max_memory: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    speed: bool = False,
    ray: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    generations: str | None = None,
    gen_tokens: int = 32,
    embedding_model: str | None = None,
) -> dict[str, Any]:
    """Compare ``presets`` and ``recipes`` (YAML files) on ``model``; returns ``results.json``'s content.

    ``ray``: None runs the jobs in this process; ``"local"`` on a local Ray cluster; an address
    (``ray://host:10001``, ``host:6379``) on that cluster. ``speed`` adds decode tokens/s (torch's
    CPU kernels against float32, measured in one run per checkpoint). ``group_size`` regroups the
    recipes whose weights are in groups (the demo's 576-wide layers need 64 or 32).
    ``generations``: a prompt file (``.txt``, ``.jsonl``) or ``demo`` (prompts drawn from the
    evaluation text) adds generation similarity (ROUGE-L of greedy and sampled continuations of
    ``gen_tokens`` tokens; sentence-embedding cosine with ``embedding_model``)."""
    from lowbit import preflight
    from lowbit.data import calibration_samples
    from lowbit.data import eval_windows as make_windows
    from lowbit.eval.store import eval_settings, model_identity, versions
    from lowbit.outdir import output_lock
    from lowbit.source import open_source

    started = time.perf_counter()
    _check_available()
    chosen = _recipes(presets, recipes, group_size)
    out = Path(out)
    threads = threads or torch.get_num_threads()
    eval_source = eval_data or calib
    skeleton = preflight.skeleton(model, trust_remote_code)
    for recipe in chosen:  # every recipe against the model's layers, the sources, the disk: before any work
        preflight.check_quantize(model, recipe, out, [calib, eval_source], model=skeleton)
    # local paths made absolute: a Ray worker does not run in this directory
    model, calib, eval_source = (str(model_identity(x)) for x in (model, calib, eval_source))
    executor: InProcess | RayExecutor = InProcess() if ray is None else RayExecutor(ray, threads, _gpus(device))
    prepare_dir(out)
    try:
        with output_lock(out):
            _, tokenizer = open_source(model, trust_remote_code=trust_remote_code)
            windows = make_windows(tokenizer, eval_source, seq_len=eval_seq_len, n_windows=eval_windows)
            calib_ids = None
            if any(results.needs_data(r) for r in chosen):
                calib_ids = calibration_samples(tokenizer, calib, n_samples=samples, seq_len=seq_len, seed=seed)
            options = {"calib": calib, "samples": samples, "seq_len": seq_len, "seed": seed}
            options |= {"batch_size": batch_size, "device": device}
            common = {
                "model": model,
                "max_memory": max_memory,
                "threads": threads,
                "trust_remote_code": trust_remote_code,
            }
            q_tasks = [_quantize_task(r, out, calib_ids, options, common) for r in chosen]
            prompts = _prompts(generations, eval_source)
            gen = {
                "prompts_sha256": _sha256_lines(prompts),
                "gen_tokens": gen_tokens,
                "embedding_model": embedding_model,
            }
            settings = eval_settings(eval_source, windows, model, batch_size, gen if prompts else None)
            bar = tqdm(total=2 * len(chosen), desc="compare", unit="job", disable=not progress)
            model_bytes = sum(p.numel() * 4 for p in skeleton.parameters())
            n_blocks = getattr(skeleton.config, "num_hidden_layers", 1) or 1
            try:
                q_records = _quantize_all(executor, q_tasks, bar, quantize_memory(model_bytes, n_blocks))
                e_tasks = [
                    jobs.EvalTask(
                        t.name,
                        model,
                        t.ckpt,
                        windows,
                        settings,
                        batch_size,
                        threads,
                        trust_remote_code,
                        prompts=tuple(prompts),
                        gen_tokens=gen_tokens,
                        embedding_model=embedding_model,
                    )
                    for t in q_tasks
                ]
                evals = _evaluate_all(executor, e_tasks, bar, eval_memory(model_bytes))
            finally:
                bar.close()
                executor.close()
            speeds = _speeds(q_tasks, threads, trust_remote_code, progress) if speed else {}
            data = {
                "calibration_sha256": jobs.ids_sha256(calib_ids),
                "eval_windows_sha256": settings["windows_sha256"],
                "eval_key": _key(settings),
            }
            doc = results.assemble(chosen, q_records, evals, out, model, options, settings, data)
            doc["versions"] = versions()
            doc["timings"] = results.timings(
                [r.name for r in chosen], q_records, evals, speeds, time.perf_counter() - started
            )
            doc["host"] = _host(executor, out, threads)
            write_all(doc, out)
            return doc
    except BaseException:
        executor.close()
        raise


def write_all(doc: dict[str, Any], out: Path) -> None:
    """results.json, results.csv, results.md, plots/*.png and report.html, each written atomically."""
    from lowbit.durable import write_json
    from lowbit.lab.plots import draw_all
    from lowbit.lab.report_html import render

    plots = draw_all(doc)
    (out / "plots").mkdir(exist_ok=True)
    for name, png in plots.items():
        write_bytes(out / "plots" / f"{name}.png", png)
    write_text(out / "results.csv", results.to_csv(doc))
    write_text(out / "results.md", results.to_markdown(doc))
    write_text(out / "report.html", render(doc, plots))
    write_json(out / "results.json", doc)  # last: its presence says the rest is there


def _key(settings: dict[str, Any]) -> str:
    from lowbit.eval.store import settings_key

    return settings_key(settings)


def _gpus(device: str) -> float:
    return 1.0 if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else 0.0


def _quantize_task(
    recipe: Recipe, out: Path, calib_ids: torch.Tensor | None, options: dict[str, Any], common: dict[str, Any]
) -> jobs.QuantizeTask:
    """The job that makes ``out/checkpoints/<name>``, with the fingerprint it is reused by."""
    reads_data = results.needs_data(recipe)
    data_sha = jobs.ids_sha256(calib_ids) if reads_data else None
    # a data-free recipe runs no pass over text: its checkpoint depends on neither the draw nor the batch size
    numbers = options if reads_data else {"device": options["device"]}
    model = jobs.model_fingerprint(common["model"])
    fingerprint = jobs.quantize_fingerprint(recipe.to_dict(), model, data_sha, numbers)
    return jobs.QuantizeTask(
        name=recipe.name,
        recipe=recipe.to_dict(),
        ckpt=str((out / "checkpoints" / recipe.name).resolve()),
        record=str((out / "jobs" / f"{recipe.name}.json").resolve()),
        fingerprint=fingerprint,
        **options,
        **common,
    )


def _quantize_all(
    executor: InProcess | RayExecutor, tasks: list[jobs.QuantizeTask], bar: Any, memory: int
) -> list[dict[str, Any]]:
    """Each task's job record, with ``reused``: a finished equal checkpoint is not quantized again."""
    records: list[dict[str, Any] | None] = [None] * len(tasks)
    todo = []
    for i, task in enumerate(tasks):
        found = jobs.reusable(task)
        if found is not None:
            records[i] = {**found, "reused": True}
            bar.update(1)
        else:
            todo.append(i)
    bar.set_postfix_str(f"quantizing {', '.join(tasks[i].name for i in todo)}" if todo else "")
    for k, record in executor.map(jobs.quantize_job, [tasks[i] for i in todo], memory):
        records[todo[k]] = {**record, "reused": False}
        bar.update(1)
    return [r for r in records if r is not None]


def _evaluate_all(
    executor: InProcess | RayExecutor, tasks: list[jobs.EvalTask], bar: Any, memory: int
) -> list[dict[str, Any]]:
    """Each checkpoint's evaluation, with ``reused`` when it was read back from the checkpoint."""
    from lowbit.eval.store import load_result

    found: list[dict[str, Any] | None] = [None] * len(tasks)
    todo = []
    for i, task in enumerate(tasks):
        stored = load_result(task.ckpt, task.settings)
        if stored is not None:
            found[i] = {"metrics": stored["metrics"], "reused": True, "host": None}
            bar.update(1)
        else:
            todo.append(i)
    bar.set_postfix_str(f"evaluating {', '.join(tasks[i].name for i in todo)}" if todo else "")
    for k, result in executor.map(jobs.evaluate_job, [tasks[i] for i in todo], memory):
        found[todo[k]] = result
        bar.update(1)
    return [r for r in found if r is not None]


def _speeds(tasks: list[jobs.QuantizeTask], threads: int, trust: bool, progress: bool) -> dict[str, Any]:
    """Decode tokens/s of each checkpoint: torch's CPU kernels (``kernels``) against float32 (``fp32``),
    both timed in one ``lowbit.speed.bench`` run (here, never on Ray: timings need a quiet machine)."""
    from lowbit.speed import BenchSettings, bench

    settings = BenchSettings(prompt_len=64, new_tokens=16, batches=(1,), paths=("fp32", "kernels"), threads=threads)
    settings.trust_remote_code = trust
    speeds = {}
    for task in tqdm(tasks, desc="decode speed", unit="model", disable=not progress):
        result = bench(task.ckpt, settings)
        rows = {r["path"]: r for r in result.rows}
        speeds[task.name] = {
            "fp32_tok_s": rows.get("fp32", {}).get("decode_tok_s"),
            "kernels_tok_s": rows.get("kernels", {}).get("decode_tok_s"),
            "kernels_x_fp32": rows.get("kernels", {}).get("decode_x_fp32"),
            "skipped": result.skipped,
        }
    return speeds


def _host(executor: InProcess | RayExecutor, out: Path, threads: int) -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "executor": executor.name,
        "ray_address": executor.address,
        "out": str(out.resolve()),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def read_results(out: str | Path) -> dict[str, Any]:
    """``results.json`` of a compare directory."""
    path = Path(out) / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read {path} ({exc}); run lowbit compare into {out} first") from exc
    return doc


__all__ = ["compare", "read_results"]
