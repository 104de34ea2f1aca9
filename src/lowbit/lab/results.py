"""A sweep's results: ``results.json`` assembled from the job records and evaluations, and the
tables made from it (CSV, Markdown, the terminal's rich table), written with the plots and the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.eval.recovery import recoveries
from lowbit.eval.store import model_identity
from lowbit.scheme import Recipe

# fields of EvalResult that describe the run rather than the model's quality
_NOT_METRICS = {"seconds", "n_windows", "seq_len", "n_tokens", "baseline_perplexity"}

# (key, header, format): the columns of results.csv, results.md, the terminal and the HTML table
COLUMNS: list[tuple[str, str, str]] = [
    ("name", "recipe", ""),
    ("scheme", "scheme", ""),
    ("bits_per_weight", "bits/w", ".3f"),
    ("perplexity", "perplexity", ".3f"),
    ("perplexity_recovery", "ppl recovery %", ".2f"),
    ("kl", "KL (nats/tok)", ".5f"),
    ("kl_recovery", "exp(-KL) %", ".2f"),
    ("top1_agreement", "top-1 agree %", ".2f"),
    ("quantize_seconds", "quantize s", ".1f"),
]
SPEED_COLUMNS: list[tuple[str, str, str]] = [
    ("kernels_tok_s", "decode tok/s", ".1f"),
    ("kernels_x_fp32", "x fp32", ".2f"),
]
# generation similarity (``--generations``): shown when measured
GENERATION_COLUMNS: list[tuple[str, str, str]] = [
    ("rouge_l", "ROUGE-L greedy", ".3f"),
    ("rouge_l_sampled", "ROUGE-L sampled", ".3f"),
    ("embedding_similarity", "embedding cos", ".3f"),
]


def needs_data(recipe: Recipe) -> bool:
    """Whether quantizing ``recipe`` reads calibration text (``lowbit.stages.needs_data``)."""
    from lowbit.algorithms import build_algorithm
    from lowbit.stages import needs_data as stage_needs

    return stage_needs(recipe, [build_algorithm(s.name, s.params) for s in recipe.steps])


def checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "lowbit.json").read_text())


def bits_per_weight(meta: dict[str, Any]) -> float | None:
    """Average bits per weight of the quantized layers, weighted by their sizes (``lowbit.json``'s
    layer shapes and its run report's bits per weight)."""
    shapes = meta.get("layers", {})
    total_bits, total = 0.0, 0
    for layer in meta.get("report", {}).get("layers", []):
        entry = shapes.get(layer["name"])
        if entry and layer.get("weights") != "float":
            n = entry["shape"][0] * entry["shape"][1]
            total_bits, total = total_bits + layer["bits_per_weight"] * n, total + n
    return total_bits / total if total else None


def file_mb(ckpt: Path) -> float:
    return sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20


def assemble(
    chosen: Sequence[Recipe],
    q_records: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
    out: Path,
    model: str,
    options: dict[str, Any],
    eval_settings: dict[str, Any],
    data: dict[str, Any],
) -> dict[str, Any]:
    """``results.json`` without its ``versions``, ``timings`` and ``host`` parts."""
    base_ppl = evals[0]["metrics"].get("baseline_perplexity")
    original: dict[str, Any] = {"perplexity": base_ppl}
    if isinstance(base_ppl, float) and base_ppl > 0 and math.isfinite(base_ppl):
        original["nll"] = math.log(base_ppl)
    rows, layers, job_list = [], {}, []
    for recipe, record, ev in zip(chosen, q_records, evals, strict=True):
        ckpt = out / "checkpoints" / recipe.name
        meta = checkpoint_meta(ckpt)
        metrics = {k: v for k, v in ev["metrics"].items() if k not in _NOT_METRICS}
        report = meta.get("report", {})
        rows.append(
            {
                "name": recipe.name,
                "scheme": recipe.scheme.describe(),
                "steps": "+".join(s.name for s in recipe.steps),
                "bits_per_weight": bits_per_weight(meta),
                "file_mb": file_mb(ckpt),
                **metrics,
                "recovery": recoveries(metrics, original),
                "data_free": report.get("forward_passes", 0) == 0,
                "checkpoint": f"checkpoints/{recipe.name}",
            }
        )
        layers[recipe.name] = [
            {"layer": r["name"], "rel_error": r["rel_error"], "error_on": r.get("error_on", "outputs")}
            for r in report.get("layers", [])
        ]
        job_list.append(
            {
                "name": recipe.name,
                "quantize": "reused" if record["reused"] else "quantized",
                "evaluate": "reused" if ev["reused"] else "computed",
            }
        )
    settings = {**options, "eval_data": eval_settings["data"], "eval_windows": eval_settings["n_windows"]}
    settings["eval_seq_len"] = eval_settings["seq_len"]
    return {
        "format": 1,
        "model": model_identity(model),
        "settings": settings,
        "data": data,
        "original": original,
        "rows": rows,
        "layers": layers,
        "recipes": {r.name: r.to_dict() for r in chosen},
        "jobs": job_list,
    }


def timings(
    names: Sequence[str],
    q_records: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
    speeds: dict[str, Any],
    total: float,
) -> dict[str, Any]:
    """The part of ``results.json`` that differs from run to run: seconds and tokens/s."""
    rows = {}
    for name, record, ev in zip(names, q_records, evals, strict=True):
        rows[name] = {
            "quantize_seconds": record.get("seconds"),
            "eval_seconds": ev["metrics"].get("seconds"),
            "quantize_host": record.get("host"),
            "eval_host": ev.get("host"),
            **speeds.get(name, {}),
        }
    return {"total_seconds": total, "rows": rows, "speed": bool(speeds)}


def table_rows(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """The original and one row per recipe, with the columns to show (speed only when measured)."""
    columns = COLUMNS + (SPEED_COLUMNS if doc["timings"].get("speed") else [])
    columns += [c for c in GENERATION_COLUMNS if any(row.get(c[0]) is not None for row in doc["rows"])]
    base = doc["original"]
    out = [{"name": "original", "scheme": "float", "perplexity": base.get("perplexity"), "perplexity_recovery": 100.0}]
    for row in doc["rows"]:
        rec = row.get("recovery", {})
        top1 = row.get("top1_agreement")
        out.append(
            {
                **row,
                "perplexity_recovery": rec.get("perplexity"),
                "kl_recovery": rec.get("kl"),
                "top1_agreement": None if top1 is None else 100 * top1,
                **doc["timings"]["rows"].get(row["name"], {}),
            }
        )
    return out, columns


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    return str(value)


def to_csv(doc: dict[str, Any]) -> str:
    rows, columns = table_rows(doc)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key for key, _, _ in columns])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for key, _, _ in columns])
    return buf.getvalue()


def to_markdown(doc: dict[str, Any]) -> str:
    rows, columns = table_rows(doc)
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |"]
    lines.append("|" + "|".join("---" if not f else "---:" for _, _, f in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines) + "\n"


def rich_table(doc: dict[str, Any]) -> Any:
    """The table as a ``rich.table.Table`` for the terminal."""
    from rich.table import Table

    rows, columns = table_rows(doc)
    columns = [c for c in columns if c[0] != "scheme"]  # the long scheme text is in results.md and the report
    s = doc["settings"]
    title = f"{doc['model']}: {s['eval_windows']} x {s['eval_seq_len']} tokens of {s['eval_data']}"
    table = Table(title=title)
    for _, header, fmt in columns:
        table.add_column(header, justify="right" if fmt else "left")
    for row in rows:
        table.add_row(*(cell(row.get(k), f) for k, _, f in columns))
    return table
