"""The lab's command-line parts: ``lowbit eval --tasks/--generations`` and ``lowbit analyze``.

Kept apart from ``cli.py`` / ``cli_parser.py`` (which call in here) so those stay small; nothing
heavy is imported at module level, so ``lowbit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

__all__ = ["add_analyze_parser", "add_eval_options", "analyze_command", "eval_extras", "format_extras"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_eval_options(e: argparse.ArgumentParser) -> None:
    """``lowbit eval``'s task and generation options."""
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-evaluation-harness tasks, run on the model (and on --baseline): lowbit's "
        "local lowbit_mc and lowbit_lastword, tasks defined by YAML files under --task-path, or lm-eval's own",
    )
    e.add_argument("--task-path", action="append", default=[], help="a directory of lm-eval task YAMLs (repeatable)")
    e.add_argument("--task-limit", type=_positive, default=None, help="at most this many documents per task")
    e.add_argument(
        "--generations",
        default=None,
        metavar="PROMPTS",
        help="generation similarity against --baseline: a .txt (one prompt a line) or .jsonl prompt file, or "
        "'demo' for prompts drawn from the evaluation text",
    )
    e.add_argument("--gen-tokens", type=_positive, default=48, help="tokens generated per prompt (default 48)")
    e.add_argument("--gen-seed", type=int, default=0, help="seed of the sampled continuations (default 0)")
    e.add_argument(
        "--embedding-model",
        default=None,
        help="sentence-transformers model (local directory, or a Hub name in the local cache) for the "
        "embedding similarity of generations; without it that score is left out",
    )
    e.add_argument(
        "--allow-download", action="store_true", help="let --embedding-model be downloaded from the Hub if not cached"
    )


def eval_extras(model: Any, baseline: Any, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What ``--tasks`` and ``--generations`` add to ``lowbit eval``'s result."""
    out: dict[str, Any] = {}
    progress = not args.quiet
    if args.generations:
        from lowbit.eval.similarity import default_prompts, generation_similarity, load_prompts

        if baseline is None:
            raise LowbitError("--generations compares with the original: give it as --baseline")
        prompts = default_prompts(args.data) if args.generations == "demo" else load_prompts(args.generations)
        out["generations"] = generation_similarity(
            baseline,
            model,
            tok,
            prompts,
            args.gen_tokens,
            args.gen_seed,
            args.embedding_model,
            allow_download=args.allow_download,
            progress=progress,
        )
    if args.tasks:
        from lowbit.eval.lm_eval_adapter import run_tasks

        names = _names(args.tasks)
        out["tasks"] = {"model": run_tasks(model, tok, names, args.task_path, args.task_limit, progress=progress)}
        if baseline is not None:
            out["tasks"]["baseline"] = run_tasks(
                baseline, tok, names, args.task_path, args.task_limit, progress=progress
            )
    return out


def format_extras(extras: dict[str, Any]) -> str:
    """Text lines for the terminal."""
    lines = []
    gen = extras.get("generations")
    if gen:
        lines.append(f"generation similarity: {gen['n_prompts']} prompts x {gen['max_new_tokens']} tokens")
        for mode in ("greedy", "sampled"):
            g = gen[mode]
            emb = "-" if g["embedding_cosine"] is None else f"{g['embedding_cosine']:.4f}"
            lines.append(
                f"  {mode:>8}: ROUGE-L {g['rouge_l']:.4f}  identical {g['exact_match']:.0%}  embedding cos {emb}"
            )
        if gen["embedding_note"]:
            lines.append(f"  note: {gen['embedding_note']}")
    for who, table in (extras.get("tasks") or {}).items():
        for task, metrics in table.items():
            shown = "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
            lines.append(f"task {task} ({who}): {shown}")
    return "\n".join(lines)


def add_analyze_parser(sub: Any) -> None:
    a = sub.add_parser(
        "analyze",
        help="outlier features, their stability, INT vs FP per layer, per-cluster ranges, MSE vs KL (plots, tables)",
        description="Observe MODEL on calibration text and answer the papers' questions: outlier features as "
        "LLM.int8() defines them (|x| >= 6, in >= 25%% of layers, >= 6%% of tokens) per layer and channel; the "
        "Jaccard overlap of each layer's top-k channels between disjoint calibration halves and between "
        "--domains; INT against FP per layer at 8 and 4 bits for weights and activations (tensor and "
        "layer-output MSE); per-cluster against per-channel activation ranges (RPTQ); each layer's weight MSE "
        "against the KL it causes when quantized alone, with the Spearman rank correlation. Writes "
        "analysis.json, analysis.md and PNG plots into --out. No weight is changed.",
    )
    a.add_argument("model", help="the float model: Hub id, local HF directory, .gguf file or 'demo'")
    a.add_argument("--calib", default="demo", help="calibration text (same forms as quantize --calib)")
    a.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    a.add_argument("--domains", default=None, help="comma-separated text sources compared with each other (2 or more)")
    a.add_argument(
        "--samples", type=_positive, default=16, help="calibration windows, split in two halves (default 16)"
    )
    a.add_argument("--seq-len", type=_positive, default=128, help="tokens per window (default 128)")
    a.add_argument("--seed", type=int, default=0, help="seed of the window draw and K-means (default 0)")
    a.add_argument("--top-k", type=_positive, default=8, help="channels per layer compared across inputs (default 8)")
    a.add_argument("--clusters", default="1,2,4,8,16", help="cluster counts for the RPTQ study (default 1,2,4,8,16)")
    a.add_argument(
        "--group-size", type=_positive, default=None, help="weight groups (default: 128, 64 or 32, dividing)"
    )
    a.add_argument("--kl-sequences", type=_positive, default=2, help="sequences for the per-layer KL (default 2)")
    a.add_argument("--kl-layers", type=int, default=None, help="linears in the MSE-vs-KL study (default all; 0 skips)")
    a.add_argument("--batch-size", type=_positive, default=4, help="sequences per forward pass (default 4)")
    a.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: all cores)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.add_argument("--trust-remote-code", action="store_true", help="let a model repository run its own code")


def analyze_command(args: argparse.Namespace) -> int:
    from lowbit import api
    from lowbit.analysis import AnalyzeOptions, analyze, write_report
    from lowbit.analysis.report import summarize

    domains = tuple(_names(args.domains)) if args.domains else ()
    if len(domains) == 1:
        raise LowbitError("--domains compares text sources with each other: give at least two, comma-separated")
    try:
        clusters = tuple(sorted({int(k) for k in _names(args.clusters)}))
    except ValueError:
        raise LowbitError(f"--clusters must be comma-separated positive integers, got {args.clusters!r}") from None
    if not clusters or clusters[0] < 1:
        raise LowbitError(f"--clusters must be positive integers, got {args.clusters!r}")
    if args.kl_layers is not None and args.kl_layers < 0:
        raise LowbitError(f"--kl-layers must be 0 (skip) or more, got {args.kl_layers}")
    from lowbit.data import check_source

    for source in (args.calib, *domains):
        check_source(source)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file; give a directory")
    if api.is_quantized_dir(args.model):
        raise LowbitError(
            f"{args.model} is a lowbit checkpoint; analyze studies the float model: give the original model"
        )
    model, tok = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
    if tok is None:
        raise LowbitError(f"{args.model} has no tokenizer files; analyze needs one to read the calibration text")
    options = AnalyzeOptions(
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        top_k=args.top_k,
        clusters=clusters,
        group_size=args.group_size,
        kl_sequences=args.kl_sequences,
        kl_layers=args.kl_layers,
        domains=domains,
    )
    result = analyze(model, tok, args.calib, options, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    files = write_report(result, out)
    summary = summarize(result)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print((out / "analysis.md").read_text().split("## Per layer")[0].rstrip())
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0
