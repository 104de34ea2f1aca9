"""``lowbit`` command line: thin commands over :mod:`lowbit.api`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowbit.cli_parser import EPILOG, EXPORT_EPILOG, build_parser  # noqa: F401  (re-exported)
from lowbit.errors import LowbitError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    restore_bars = False
    if getattr(args, "quiet", False):  # also transformers' own bars ("Loading weights"); restored below
        from transformers.utils import logging as hf_logging

        restore_bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "presets":
            return _presets(args.name)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "export":
            return _export(args)
        if args.command == "run":
            return _run(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "analyze":
            from lowbit.cli_lab import analyze_command

            return analyze_command(args)
        if args.command == "qat":
            return _qat(args)
        if args.command == "compare":
            from lowbit.lab.cli_compare import run_compare

            return run_compare(args)
        return _eval(args)
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "quantize":
            print(
                "lowbit: interrupted; the finished blocks are kept next to the output: add --resume to the same "
                "command to continue from them",
                file=sys.stderr,
            )
        elif args.command == "qat":
            print(
                "lowbit: interrupted; add --resume to the same command to continue from the last saved step",
                file=sys.stderr,
            )
        elif args.command == "compare":
            print("lowbit: interrupted; run the same command again: finished work is reused", file=sys.stderr)
        else:
            print("lowbit: interrupted; no partial output was left in place", file=sys.stderr)
        return 130
    finally:
        if restore_bars:
            hf_logging.enable_progress_bar()


def _export(args: argparse.Namespace) -> int:
    from lowbit.export import export_checkpoint
    from lowbit.export.base import parse_options
    from lowbit.outdir import check_output

    check_output(args.out, args.overwrite, model_dir=args.checkpoint)  # before the checkpoint is loaded
    result = export_checkpoint(
        args.checkpoint,
        args.fmt,
        args.out,
        parse_options(args.opt),
        args.overwrite,
        trust_remote_code=args.trust_remote_code,
        verify=not args.no_verify,
    )
    print(f"wrote {result.format} to {result.out}: {', '.join(result.files)}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from lowbit import api
    from lowbit.generate import generate_text
    from lowbit.kernels import kernel_layer_count, kernels_available, use_kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = api.load_any(args.model, trust_remote_code=args.trust_remote_code, verify=not args.no_verify)
    if tok is None:
        raise LowbitError(f"{args.model} has no tokenizer files; save the model with its tokenizer to run prompts")
    kernels = args.kernels
    if kernels is None:  # on where they take some layer; a float model stays float32
        kernels = kernels_available() and kernel_layer_count(model) > 0
    mode = "no kernels: lowbit's float32 reference"
    if kernels:
        report = use_kernels(model)
        mode = "; ".join(report.lines())
    gen = generate_text(model, tok, args.prompt, args.max_new_tokens, chat=not args.raw)
    t = gen.timing
    print(gen.text, flush=True)
    decode = f"{t.decode_tok_s:.1f} tok/s" if t.decode_tok_s else "-"
    seconds = t.prefill_s + t.decode_s
    print(
        f"[{gen.new_tokens} tokens in {seconds:.2f} s ({gen.new_tokens / seconds:.1f} tok/s): prompt "
        f"{gen.prompt_tokens} tokens at {t.prefill_tok_s:.1f} tok/s, decode {decode}; {mode}]",
        file=sys.stderr,
    )
    return 0


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LowbitError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise LowbitError(f"{what} must be positive integers, got {text!r}")
    return values


def _bench(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from lowbit.speed import BenchSettings, bench, format_bench
    from lowbit.verify import hashes_unchecked

    settings = BenchSettings(
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batches=_int_list(args.batch, "--batch"),
        paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()),
        threads=args.threads,
        repeat=args.repeat,
        baseline=args.baseline,
        trust_remote_code=args.trust_remote_code,
    )
    settings.check()
    log = None if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    with hashes_unchecked() if args.no_verify else nullcontext():  # bench loads the checkpoint itself
        result = bench(args.model, settings, log)
    print(json.dumps(result.to_dict(), indent=1) if args.json else format_bench(result))
    return 0


def _presets(name: str | None) -> int:
    from lowbit.presets import PRESETS, get_preset

    if name is not None:
        import yaml

        recipe = get_preset(name)
        print(f"# {name}: {PRESETS[name].description}")
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=100), end="")
        return 0
    rows = [(n, p.scheme.describe(), "+".join(s.name for s in p.steps), p.description) for n, p in PRESETS.items()]
    header = ("preset", "scheme", "steps", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    room = None
    if sys.stdout.isatty():  # one line per preset on a terminal; the full text with `lowbit presets NAME`
        import shutil

        room = max(20, shutil.get_terminal_size().columns - sum(widths) - 6)
    for cells in [header, *rows]:
        text = cells[3] if room is None or len(cells[3]) <= room else cells[3][: room - 3] + "..."
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + "  " + text)
    return 0


def _windows(tok: Any, args: argparse.Namespace, source: str) -> Any:
    from lowbit import api

    return api.eval_windows(tok, source, seq_len=args.eval_seq_len, n_windows=args.eval_windows)


def _eval_rows(model: Any, baseline: Any, windows: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One pass over the windows: the model's scores and, with a baseline, the baseline's perplexity."""
    from lowbit import api

    res = api.evaluate(model, windows, baseline=baseline, batch_size=args.batch_size, progress=not args.quiet)
    row = res.to_dict()
    if baseline is None:
        return [{"model": "model", **row}]
    base = {k: row[k] for k in ("n_windows", "seq_len", "n_tokens")}
    base_row = {"model": "baseline", "perplexity": row["baseline_perplexity"], **base}
    return [base_row, {"model": "quantized", **row}]


def default_out_dir(model: str, recipe_name: str) -> Path:
    """``lowbit-out/<model>-<recipe>``: the directory or Hub name as is (``Qwen2-0.5B`` keeps its
    ``.5B``), a ``.gguf`` file's name without the suffix."""
    path = Path(model).expanduser()
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    if not name or name in (".", ".."):
        name = path.resolve().name or "model"
    root = Path("lowbit-out")
    out = root / f"{name}-{recipe_name}"
    # names come from the user's files (model directory, recipe name): the result must stay in the root
    if Path(os.path.normpath(root.resolve() / out.name)).parent != root.resolve() or out.parent != root:
        raise LowbitError(
            f"the default output directory {out} would not lie directly inside {root}/ (the recipe name "
            f"{recipe_name!r} or model name {name!r} is a path); rename the recipe or give --out"
        )
    return out


@contextlib.contextmanager
def _printed_warnings() -> Iterator[None]:
    """lowbit's own warnings as ``lowbit: warning: ...`` lines on stderr; others as Python prints them."""
    from lowbit.data import LowbitWarning

    with warnings.catch_warnings():
        show = warnings.showwarning

        def printer(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, LowbitWarning):
                print(f"lowbit: warning: {message}", file=sys.stderr)
            else:
                show(message, category, *rest, **kw)

        warnings.simplefilter("always", LowbitWarning)
        warnings.showwarning = printer
        yield


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from lowbit import api, dist, preflight
    from lowbit.checkpoint import weight_files
    from lowbit.job import Job, run_job
    from lowbit.outdir import check_output, is_lowbit_output
    from lowbit.pipeline import RunOptions, resolve_device
    from lowbit.presets import DEFAULT_PRESET
    from lowbit.scheme import with_group_size
    from lowbit.source import open_source

    started = time.perf_counter()
    recipe = api.resolve_recipe(args.recipe or args.preset or DEFAULT_PRESET)
    if args.method:
        recipe = api.with_method(recipe, args.method)
    if args.group_size:
        recipe = with_group_size(recipe, args.group_size)
    skeleton = preflight.skeleton(args.model, args.trust_remote_code)  # layers from the config; no weights read
    fitted = None if (args.recipe or args.preset or args.group_size) else preflight.fitting_group_size(recipe, skeleton)
    if fitted:  # the default preset, on a model whose widths its groups do not divide
        default_group = recipe.scheme.weights.group_size if recipe.scheme.weights else None
        recipe = with_group_size(recipe, fitted)
        print(
            f"lowbit: note: groups of {default_group} do not divide this model's layer widths; the default runs "
            f"{recipe.name} (groups of {fitted}); choose with --preset or --group-size",
            file=sys.stderr,
        )
    out = Path(args.out) if args.out else default_out_dir(args.model, recipe.name)
    # the default location holds lowbit's own earlier result for the same model and recipe (it
    # carries lowbit's marker), so a rerun replaces it (atomically); an explicit --out is only
    # replaced with --overwrite, and a directory lowbit did not write never is
    overwrite = args.overwrite or (args.out is None and is_lowbit_output(out))
    check_output(out, overwrite, model_dir=args.model)  # before the model and data are loaded
    # everything checkable before the weights or the text are read (recipe vs the model's layers, disk, sources)
    sources = [args.calib, *([] if args.no_eval else [args.eval_data or args.calib])]
    preflight.check_quantize(args.model, recipe, out, sources, model=skeleton)
    windows = None
    if not args.no_eval:  # read before quantizing, so a bad --eval-data fails before any work is done
        _, tok = open_source(args.model, trust_remote_code=args.trust_remote_code)
        windows = _windows(tok, args, args.eval_data or args.calib)
    options = RunOptions(
        batch_size=args.batch_size, progress=not args.quiet, max_memory=args.max_memory, device=args.device
    )
    job = Job(
        args.model,
        recipe,
        out,
        args.calib,
        args.samples,
        args.seq_len,
        args.seed,
        options,
        overwrite=overwrite,
        resume=args.resume,
        trust_remote_code=args.trust_remote_code,
    )
    launched = dist.init_from_env(
        device=resolve_device(args.device)
    )  # under torchrun: this process is one rank already
    with _printed_warnings():
        report = run_job(job, workers=1 if launched else args.workers)
    if not dist.is_main():
        return 0  # rank 0 writes, evaluates and prints
    for warning in report.warnings:
        print(f"lowbit: warning: {warning}", file=sys.stderr)
    size = sum(f.stat().st_size for f in weight_files(out))
    summary: dict[str, Any] = {
        "model": args.model,
        "recipe": recipe.name,
        "scheme": recipe.scheme.describe(),
        "out": str(out),
        "calibration": f"{report.n_samples} x {report.seq_len} tokens from {args.calib!r} (seed {args.seed})"
        if report.forward_passes
        else "none (the recipe needs no calibration data)",
        "threads": torch.get_num_threads(),
        "bits_per_weight": _bits_per_weight(out, report),
        "file_mb": size / 2**20,
        "quantize_seconds": report.seconds,
        "worst_layers": ", ".join(f"{r.name} {r.rel_error:.2e}" for r in report.worst_layers(3)),
    }
    if args.workers > 1:
        summary["workers"] = args.workers
    if report.spilled_bytes:
        summary["spilled_mb"] = report.spilled_bytes / 2**20
    if args.layers and not args.json:
        print(_layer_table(report))
    rows = []
    if windows is not None:  # the checkpoint as written (its hashes checked) against the original
        model, _, _ = api.load_quantized(out, trust_remote_code=args.trust_remote_code)
        baseline, _ = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
        rows = _eval_rows(model, baseline, windows, args)
        _store_eval(str(out), args.eval_data or args.calib, windows, args.model, args.batch_size, rows)
    summary["total_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps({"summary": summary, "eval": rows}, indent=1))
        return 0
    for key, value in summary.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"{key:>16}: {shown}")
    if rows:
        print(_table(rows, args))
    return 0


def _bits_per_weight(out: Path, report: Any) -> float | None:
    """Average bits per weight of the quantized layers, from the report and the checkpoint's
    layer table (shapes), without loading the checkpoint (it may not fit in memory)."""
    from lowbit.checkpoint import META_FILE

    shapes = json.loads((out / META_FILE).read_text())["layers"]
    total_bits, total = 0.0, 0
    for r in report.layers:
        if r.name in shapes and r.weights != "float":
            n = shapes[r.name]["shape"][0] * shapes[r.name]["shape"][1]
            total_bits, total = total_bits + r.bits_per_weight * n, total + n
    return total_bits / total if total else None


def _eval(args: argparse.Namespace) -> int:
    from lowbit import api

    model, tok = api.load_any(args.model, trust_remote_code=args.trust_remote_code, verify=not args.no_verify)
    baseline = None
    if args.baseline:
        baseline, base_tok = api.load_any(
            args.baseline, trust_remote_code=args.trust_remote_code, verify=not args.no_verify
        )
        tok = tok or base_tok
    if tok is None:
        raise LowbitError(f"{args.model} has no tokenizer files; give --baseline so its tokenizer can be used")
    windows = _windows(tok, args, args.data)
    rows = _eval_rows(model, baseline, windows, args)
    _store_eval(args.model, args.data, windows, args.baseline, args.batch_size, rows)
    from lowbit.cli_lab import eval_extras, format_extras

    extras = eval_extras(model, baseline, tok, args)  # --generations, --tasks
    if args.json:
        result = {"model": args.model, "baseline": args.baseline, "data": args.data, "eval": rows}
        print(json.dumps({**result, **extras}, indent=1))
    else:
        print(_table(rows, args))
        if extras:
            print(format_extras(extras))
    return 0


def _store_eval(model: str, data: str, windows: Any, baseline: str | None, batch_size: int, rows: list[Any]) -> None:
    """A lowbit checkpoint keeps its evaluation in ``eval/<key>.json`` (``lowbit.eval.store``), where
    ``lowbit compare`` finds it instead of evaluating again; other models store nothing."""
    from lowbit.eval.store import eval_settings, save_result

    metrics = {k: v for k, v in rows[-1].items() if k != "model"}
    save_result(model, eval_settings(data, windows, baseline, batch_size), metrics)


def _layer_table(report: Any) -> str:
    """One line per quantized layer: output error and what the algorithm reported."""
    from lowbit.eval import format_table

    rows = [
        {
            "layer": r.name,
            "rel_error": r.rel_error,
            "bpw": r.bits_per_weight,
            "loss": r.extra.get("gptq_loss"),
            "damp": r.extra.get("damp"),
            "seconds": r.extra.get("seconds"),
            "float_columns": r.extra.get("float_columns"),
            "alpha": r.extra.get("smooth_alpha", r.extra.get("awq_alpha")),
            "outliers": r.extra.get("outlier_dims_mean"),
        }
        for r in report.layers
    ]
    columns = [
        ("layer", "layer"),
        ("rel_error", "rel. output error", ".3e"),
        ("bpw", "bits/w", ".3f"),
        ("loss", "GPTQ loss", ".4g"),
        ("damp", "damp", "g"),
        ("seconds", "solve s", ".2f"),
        ("float_columns", "fp16 cols", ".0f"),
        ("alpha", "smooth alpha", ".2f"),
        ("outliers", "fp dims/call", ".1f"),
    ]
    return format_table(rows, columns)  # type: ignore[arg-type]


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    from lowbit.eval import format_table

    first = rows[0]
    head = f"evaluation: {first['n_windows']} windows x {first['seq_len']} tokens ({first['n_tokens']} predicted)"
    base_ppl = rows[0]["perplexity"] if len(rows) > 1 else None
    for r in rows:
        r["ppl_change"] = (r["perplexity"] / base_ppl - 1) if base_ppl and r is not rows[0] else None
    columns = [
        ("model", "model"),
        ("perplexity", "perplexity"),
        ("ppl_change", "change", "+.2%"),
        ("kl", "KL (nats/tok)", ".5f"),
        ("top1_agreement", "top-1 agree", ".2%"),
        ("seconds", "eval s", ".1f"),
    ]
    return head + "\n" + format_table(rows, columns)  # type: ignore[arg-type]


def _qat(args: argparse.Namespace) -> int:
    from lowbit import qat

    config = qat.QATConfig(
        steps=args.steps,
        lr=args.lr,
        lr_unit=args.lr_unit,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        save_every=args.save_every,
        lsq=args.lsq or args.scales_only,
        train_weights=not args.scales_only,
        scale_lr=args.scale_lr,
        distill=args.distill,
        temperature=args.temperature,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        seed=args.seed,
    )
    result = qat.train(
        args.model,
        args.recipe,
        args.data,
        args.out,
        config,
        start=args.start,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    losses = result.losses
    first = f"{losses[0]:.4g}" if losses else "-"
    last = f"{sum(losses[-10:]) / len(losses[-10:]):.4g}" if losses else "-"
    print(f"wrote {result.out}: {len(losses)} steps, loss {first} at the first step, {last} over the last 10")
    print(f"  evaluate it: lowbit eval {result.out} --baseline {args.model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
