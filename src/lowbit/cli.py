"""``lowbit`` command line: thin commands over :mod:`lowbit.api`."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowbit import __version__, defaults
from lowbit.errors import LowbitError

EPILOG = """examples:
  lowbit quantize                        # the demo: SmolLM2-135M, w4a16 in groups of 64, Shakespeare
  lowbit eval lowbit-out/demo-w4a16-g64 --baseline demo --json
  lowbit run lowbit-out/demo-w4a16-g64 --prompt "Write a sonnet about rain"
  lowbit quantize --preset w3a16 --group-size 64 --method rtn --layers   # RTN instead of GPTQ, per-layer errors
  lowbit quantize ./my-model --preset w8a8 --calib data.jsonl --out out/w8a8
  lowbit quantize model.gguf --recipe recipe.yaml --calib wikitext:wikitext-2-raw-v1
  lowbit presets w4a16                   # a preset as a recipe file to edit
  lowbit export --help                   # formats for vLLM, transformers, llama.cpp, onnxruntime
"""


EXPORT_EPILOG = """formats and options:
  compressed-tensors  int4/int8 weights (pack-quantized), W8A8 int8, FP8 (float-quantized), MXFP4, static KV
                      scales; for vLLM and transformers; --opt dtype=float32|float16|bfloat16
  gptq                HF GPTQ layout (qweight/qzeros/scales/g_idx), 2/3/4/8-bit weight-only;
                      --opt checkpoint_format=gptq (zero points stored minus 1, default) or gptq_v2
  awq                 AWQ GEMM layout, 4-bit groups (symmetric stored as zero point 8), weight-only
  gguf                llama.cpp; --opt type=f32|f16|Q8_0|Q5_0|Q5_1|Q4_0|Q4_1|Q4_K|Q6_K (default: the smallest type
                      that holds every layer's grid exactly), --opt embeddings=TYPE (default f16)
  onnx                onnxruntime; MatMulNBits for 2..8-bit weights, QuantizeLinear/DequantizeLinear for int8
                      activations; --opt accuracy_level=0..4 (0: lowbit's numerics; 4: int8 math, faster)
examples (on the demo's default output, `lowbit quantize`):
  lowbit export lowbit-out/demo-w4a16-g64 --format compressed-tensors --out exported/ct
  lowbit export lowbit-out/demo-w4a16-g64 --format gptq --out exported/gptq
  lowbit export lowbit-out/demo-w4a16-g64 --format awq --out exported/awq
  lowbit export lowbit-out/demo-w4a16-g64 --format gguf --opt type=Q4_0 --out exported/gguf
  lowbit export lowbit-out/demo-w4a16-g64 --format onnx --out exported/onnx
"""


BENCH_PATHS = "fp32,lowbit,kernels,onnxruntime"  # lowbit.speed.PATHS, without importing torch here


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a length)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model repository run its own Python code to load (its config's auto_map); off by default",
    )


def _add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not compare a lowbit checkpoint's files with the SHA-256 hashes in its lowbit.json (for a "
        "checkpoint edited on purpose); its values are still checked",
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-windows",
        type=_positive_int,
        default=defaults.EVAL_WINDOWS,
        help=f"evaluation windows (default {defaults.EVAL_WINDOWS})",
    )
    p.add_argument(
        "--eval-seq-len",
        type=_positive_int,
        default=defaults.EVAL_SEQ_LEN,
        help=f"tokens per evaluation window (default {defaults.EVAL_SEQ_LEN})",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.BATCH_SIZE,
        help=f"sequences per forward pass (default {defaults.BATCH_SIZE})",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads (default: all cores); results are deterministic for a given thread count",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Post-training quantization of LLMs: quantize, save, and measure what it cost.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quantize",
        help="quantize a model, save it, and evaluate it against the original",
        description="Quantize MODEL with a preset or recipe, save it to --out, then evaluate it against the "
        "original on held-out text (perplexity, KL divergence, top-1 agreement). With no arguments: the "
        "demo model (SmolLM2-135M-Instruct from PyPI) with the default preset on Shakespeare.",
    )
    q.add_argument("model", nargs="?", default="demo", help="Hub id, local HF directory, .gguf file or 'demo'")
    q.add_argument("--preset", default=None, help="preset name (see `lowbit presets`; default w4a16)")
    q.add_argument("--recipe", default=None, help="recipe YAML file (scheme + steps); overrides --preset")
    q.add_argument(
        "--method",
        default=None,
        help="replace the recipe's weight quantizer (rtn, gptq, owq), keeping its scheme: --preset w4a16 --method rtn",
    )
    q.add_argument(
        "--calib",
        default="demo",
        help="calibration text: .txt/.jsonl file, directory of .txt, datasets name (path[:config][@split]) or 'demo'",
    )
    q.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        help="weights in groups of this many input columns, on any preset or recipe (named e.g. w4a16-g64)",
    )
    q.add_argument(
        "--samples",
        type=_positive_int,
        default=defaults.CALIB_SAMPLES,
        help=f"calibration samples (default {defaults.CALIB_SAMPLES})",
    )
    q.add_argument(
        "--seq-len",
        type=_positive_int,
        default=defaults.CALIB_SEQ_LEN,
        help=f"tokens per calibration sample (default {defaults.CALIB_SEQ_LEN})",
    )
    q.add_argument(
        "--seed", type=int, default=defaults.SEED, help=f"seed of the calibration draw (default {defaults.SEED})"
    )
    q.add_argument("--out", default=None, help="output directory (default lowbit-out/<model>-<preset>)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--no-eval", action="store_true", help="skip the evaluation against the original")
    q.add_argument("--eval-data", default=None, help="evaluation text (default: the --calib source's held-out split)")
    q.add_argument(
        "--layers",
        action="store_true",
        help="print every layer's error, GPTQ loss, damping, solve time, smoothing alpha and LLM.int8() float dims",
    )
    _add_trust(q)
    _add_data_args(q)

    e = sub.add_parser(
        "eval",
        help="perplexity, KL divergence and top-1 agreement of a model against a baseline",
        description="Evaluate MODEL (a lowbit output directory or any model) on non-overlapping windows of "
        "--data; with --baseline also KL(baseline || model) and top-1 agreement on the same windows.",
    )
    e.add_argument("model", help="lowbit output directory, Hub id, HF directory, .gguf or 'demo'")
    e.add_argument("--baseline", default=None, help="the original model to compare against")
    e.add_argument("--data", default="demo", help="evaluation text (same forms as --calib; default demo)")
    _add_trust(e)
    _add_data_args(e)
    _add_no_verify(e)

    x = sub.add_parser(
        "export",
        help="write a quantized model in a runtime's format (compressed-tensors, gptq, awq, gguf, onnx)",
        description="Convert a lowbit checkpoint (the --out of `lowbit quantize`) into a format that a runtime "
        "loads. Every layer is checked first: when the format cannot hold a layer's grid (bits, group size, "
        "symmetry, activation or KV quantization), nothing is written and the error names the layers and the "
        "property. The output appears only when complete.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    x.add_argument("checkpoint", help="lowbit checkpoint directory")
    x.add_argument("--format", required=True, dest="fmt", help="compressed-tensors, gptq, awq, gguf or onnx")
    x.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    x.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE", help="a format option, e.g. --opt type=Q4_K"
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_trust(x)
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_no_verify(x)

    _add_run_parsers(sub)
    ps = sub.add_parser(
        "presets",
        help="list the presets, or print one as a recipe",
        description="Without NAME: a table of the presets (name, scheme, steps, description). With NAME: that "
        "preset's full recipe as YAML, ready to edit and pass to `lowbit quantize --recipe`.",
    )
    ps.add_argument("name", nargs="?", default=None, help="a preset to print as a recipe")
    return parser


def _add_run_parsers(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="generate a reply to a prompt with a quantized model (greedy), and print tokens/s",
        description="Load MODEL (a lowbit checkpoint or any model `lowbit eval` takes), generate greedily "
        "from --prompt (through the tokenizer's chat template unless --raw), print the text on stdout and the "
        "speed on stderr. "
        "With kernels (the default where torch has them), 4-bit and 8-bit per-channel layers run on torch's "
        "CPU low-bit kernels and the model computes in bfloat16: faster, and numerically close to but not the "
        "same as lowbit's float32 reference (--no-kernels).",
    )
    r.add_argument("model", help="lowbit output directory, Hub id, HF directory, .gguf or 'demo'")
    r.add_argument("--prompt", required=True, help="the text to reply to")
    r.add_argument("--max-new-tokens", type=_positive_int, default=64, help="most tokens to generate (default 64)")
    r.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run quantized layers on torch's int4/int8 CPU kernels in bfloat16 (default: on when this torch has "
        "them and they take some layer of the model)",
    )
    r.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    r.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_trust(r)
    _add_no_verify(r)

    b = sub.add_parser(
        "bench",
        help="prefill and decode tokens/s of fp32, lowbit, kernels and onnxruntime, against the bandwidth bound",
        description="Time greedy generation (random prompt of --prompt-len tokens, then --new-tokens decode steps "
        "with a KV cache) at each batch size on each path, in one run: fp32 (the float model in PyTorch: the "
        "checkpoint's dequantized weights, or --baseline), lowbit (QuantLinear, float32), kernels (torch's "
        "int4/int8 CPU kernels, bfloat16 activations) and onnxruntime (the checkpoint exported to ONNX; skipped "
        "with the reason when the exporter refuses it). Prints tokens/s, the ratio to fp32, the bytes each decode "
        "step reads (weights as stored + KV cache), the bound that the measured copy bandwidth puts on decoding, "
        "and the tensors' memory (weights + KV cache, computed).",
    )
    b.add_argument("model", help="lowbit output directory (or any model)")
    b.add_argument("--baseline", default=None, help="float model for the fp32 path (default: dequantized weights)")
    b.add_argument("--prompt-len", type=_positive_int, default=128, help="prompt tokens (default 128)")
    b.add_argument("--new-tokens", type=_positive_int, default=32, help="decode steps timed (default 32)")
    b.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    b.add_argument("--paths", default=BENCH_PATHS, help=f"comma-separated paths (default {BENCH_PATHS})")
    b.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("--repeat", type=_positive_int, default=1, help="timed rounds over all paths, best kept (default 1)")
    b.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    b.add_argument("--quiet", action="store_true", help="no progress messages")
    _add_trust(b)
    _add_no_verify(b)


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
        return _eval(args)
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
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

    from lowbit import api, preflight
    from lowbit.checkpoint import WEIGHTS_FILE
    from lowbit.outdir import check_output, is_lowbit_output
    from lowbit.presets import DEFAULT_PRESET
    from lowbit.scheme import with_group_size

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
    model, tok = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
    with _printed_warnings():
        calib = api.calibration_samples(tok, args.calib, n_samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    # the evaluation text is read before quantizing, so a bad --eval-data fails before any work is done
    windows = None if args.no_eval else _windows(tok, args, args.eval_data or args.calib)
    baseline = None if windows is None else copy.deepcopy(model)
    report = api.quantize(model, recipe, calib, batch_size=args.batch_size, progress=not args.quiet)
    for warning in report.warnings:
        print(f"lowbit: warning: {warning}", file=sys.stderr)
    api.save_quantized(model, tok, out, report, overwrite=overwrite)
    size = (out / WEIGHTS_FILE).stat().st_size
    summary: dict[str, Any] = {
        "model": args.model,
        "recipe": recipe.name,
        "scheme": recipe.scheme.describe(),
        "out": str(out),
        "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens from {args.calib!r} (seed {args.seed})",
        "threads": torch.get_num_threads(),
        "bits_per_weight": api.bits_per_weight(model),
        "file_mb": size / 2**20,
        "quantize_seconds": report.seconds,
        "worst_layers": ", ".join(f"{r.name} {r.rel_error:.2e}" for r in report.worst_layers(3)),
    }
    if args.layers and not args.json:
        print(_layer_table(report))
    rows = [] if windows is None else _eval_rows(model, baseline, windows, args)
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
    rows = _eval_rows(model, baseline, _windows(tok, args, args.data), args)
    if args.json:
        print(json.dumps({"model": args.model, "baseline": args.baseline, "data": args.data, "eval": rows}, indent=1))
    else:
        print(_table(rows, args))
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
