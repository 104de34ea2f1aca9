"""The ``lowbit`` command line's parser: commands, options, help texts and examples."""

from __future__ import annotations

import argparse
from typing import Any

from lowbit import __version__, defaults
from lowbit.cli_lab import add_analyze_parser, add_eval_options

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


_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def _size(text: str) -> int:
    """argparse type: a size in bytes, with an optional unit (KB, MB, GB, TB; powers of 1024)."""
    number = text.strip().upper().replace("IB", "B")
    unit = next((u for u in ("TB", "GB", "MB", "KB", "B") if number.endswith(u)), "")
    try:
        value = float(number.removesuffix(unit) if unit else number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 512MB, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size of at least 0, got {text!r}")
    return int(value * _UNITS[unit])


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
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run into the same --out from its last finished block (same model, recipe, "
        "calibration and options); the checkpoint equals an uninterrupted run's",
    )
    q.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="calibration activations kept in memory, e.g. 2GB or 512MB; the rest go to temporary files "
        "(default: no limit). Weights are read one block at a time either way",
    )
    q.add_argument(
        "--device",
        default="cpu",
        help="where each block and its activations are processed: cpu, cuda, cuda:N or auto (default cpu); "
        "weights stay on disk and in host memory",
    )
    q.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="data-parallel processes on this machine: calibration samples are split between them and their "
        "statistics summed (default 1; under torchrun, one per rank)",
    )
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
    add_eval_options(e)

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
    add_analyze_parser(sub)
    _add_qat_parser(sub)
    _add_compare_parser(sub)
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


def _add_qat_parser(sub: Any) -> None:
    t = sub.add_parser(
        "qat",
        help="quantization-aware training: fine-tune through the recipe's quantizers, save a lowbit checkpoint",
        description="Train MODEL's linear weights through fake-quantized weights and input activations (the "
        "recipe's specs; straight-through gradients, optionally LSQ step sizes), by distillation from the float "
        "model (KL of the next-token distributions) or next-token cross entropy on --data, with AdamW. Starts "
        "from the recipe's RTN grid, or from a lowbit checkpoint (--from, e.g. GPTQ's). The state is saved every "
        "--save-every steps next to --out (.NAME.qat) for --resume; the result is a normal lowbit checkpoint "
        "(evaluate it with `lowbit eval OUT --baseline MODEL`).",
        epilog="examples:\n  lowbit quantize --preset w4a16 --group-size 64 --out out/w4a16-g64\n"
        "  lowbit qat demo --from out/w4a16-g64 --data demo --out out/w4a16-g64-qat --steps 100\n"
        "  lowbit eval out/w4a16-g64-qat --baseline demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("model", help="the float model (teacher and start): Hub id, HF directory, .gguf or 'demo'")
    t.add_argument("--recipe", default=None, help="preset name or recipe YAML (default with --from: the checkpoint's)")
    t.add_argument("--from", dest="start", default=None, metavar="CHECKPOINT", help="lowbit checkpoint to start from")
    t.add_argument("--data", default="demo", help="training text (its calib split; same forms as --calib)")
    t.add_argument("--out", required=True, help="output checkpoint directory")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps in all (default 100)")
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate of the weights, in --lr-unit (default 3e-3 grid steps per update; absolute: 1e-5)",
    )
    t.add_argument(
        "--lr-unit",
        choices=("grid", "absolute"),
        default="grid",
        help="grid (default): train each weight as w/s, s its group scale, so --lr is the fraction of a grid step "
        "a weight moves per update; absolute: train w itself",
    )
    t.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine", "linear"),
        default="constant",
        help="constant (default), or cosine / linear decay to 0 over --steps",
    )
    t.add_argument("--scale-lr", type=float, default=None, help="learning rate of LSQ scales (default --lr)")
    t.add_argument("--batch-size", type=_positive_int, default=1, help="windows per step (default 1)")
    t.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per window (default 512)")
    t.add_argument("--save-every", type=int, default=50, help="save the resumable state every N steps (default 50)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    t.add_argument("--lsq", action="store_true", help="learn the step sizes (LSQ, Esser et al. 2020)")
    t.add_argument(
        "--scales-only",
        action="store_true",
        help="keep every weight's code and learn only the step sizes (implies --lsq; EfficientQAT's E2E-QP)",
    )
    t.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="KL to the float model's next-token distribution (default); --no-distill: cross entropy on --data",
    )
    t.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--clip-norm", type=float, default=1.0, help="gradient norm clipping, 0 for none (default 1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the window order (default 0)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output (and a left state)")
    t.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_trust(t)


def _add_compare_parser(sub: Any) -> None:
    c = sub.add_parser(
        "compare",
        help="quantize a model with several presets/recipes, evaluate each, and write tables, plots and a report",
        description="Quantize MODEL with each of --presets and --recipes into OUT/checkpoints/<name> (a checkpoint "
        "already there made from the same recipe, model and data is reused, so a rerun or an added preset costs "
        "only the new work), evaluate each against the original (perplexity, KL, top-1 agreement, recovery), and "
        "write OUT/results.json, results.csv, results.md, plots/*.png and one self-contained report.html.",
    )
    c.add_argument("model", nargs="?", default="demo", help="Hub id, local HF directory, .gguf file or 'demo'")
    c.add_argument("--presets", default=None, help="comma-separated preset names, e.g. w4a16-rtn,w4a16,w8a8")
    c.add_argument("--recipes", default=None, help="comma-separated recipe YAML files")
    c.add_argument("--out", required=True, help="the comparison's directory (new, empty, or an earlier compare's)")
    c.add_argument("--calib", default="demo", help="calibration text (the forms `lowbit quantize --calib` takes)")
    c.add_argument("--eval", dest="eval_data", default=None, help="evaluation text (default: --calib's held-out split)")
    c.add_argument(
        "--samples",
        type=_positive_int,
        default=defaults.CALIB_SAMPLES,
        help="calibration samples (default %(default)s)",
    )
    c.add_argument(
        "--seq-len", type=_positive_int, default=defaults.CALIB_SEQ_LEN, help="tokens per sample (default %(default)s)"
    )
    c.add_argument("--seed", type=int, default=defaults.SEED, help="seed of the calibration draw (default %(default)s)")
    c.add_argument(
        "--group-size",
        type=_positive_int,
        default=None,
        help="weights in groups of this many input columns, for the recipes whose weights are grouped (per-channel "
        "ones stay per channel); named e.g. w4a16-g64",
    )
    c.add_argument(
        "--max-memory", type=_size, default=None, metavar="SIZE", help="as for quantize: activations kept in memory"
    )
    c.add_argument("--device", default="cpu", help="as for quantize: cpu, cuda, cuda:N or auto (default cpu)")
    c.add_argument("--speed", action="store_true", help="also time decoding (torch's CPU kernels against float32)")
    c.add_argument(
        "--generations",
        default=None,
        metavar="PROMPTS",
        help="add generation similarity: a .txt (one prompt a line) or .jsonl prompt file, or 'demo' (prompts "
        "drawn from the evaluation text); ROUGE-L of greedy and sampled continuations against the original's",
    )
    c.add_argument(
        "--gen-tokens", type=_positive_int, default=32, help="new tokens per continuation (default %(default)s)"
    )
    c.add_argument(
        "--embedding-model",
        default=None,
        help="sentence-transformers model (local path, or a Hub name already in the local cache) for the embedding "
        "similarity of generations; without it that score is left out",
    )
    c.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run each quantize and evaluate job as a Ray task: on a local cluster, or on the cluster at ADDRESS "
        "(needs pip install 'lowbit[ray]')",
    )
    _add_trust(c)
    _add_data_args(c)
