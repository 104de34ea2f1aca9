"""QAT from a PTQ checkpoint on the demo model: the perplexity increase before and after, in one run.

    python bench/qat.py [--samples 16] [--windows 16] [--steps 100] [--seq-len 512] [--lr 3e-3]
                        [--lr-unit grid|absolute] [--lr-schedule constant|cosine|linear] [--lsq] [--scales-only]
                        [--ptq DIR]

1. PTQ start: ``w4a16`` (GPTQ, symmetric int4) in groups of 64 (``with_group_size``, as the other
   benches), calibrated on ``--samples`` x 512 tokens of the Shakespeare calib split, saved.
2. QAT: ``lowbit.qat.train`` from that checkpoint for ``--steps`` steps of ``--batch-size`` windows of
   ``--seq-len`` tokens of the same calib split, distilled from the fp32 model.
3. Both checkpoints, loaded back, and the fp32 model on the same ``--windows`` held-out windows of
   512 tokens (the eval split: other works than the calib split): perplexity, its increase over
   fp32, KL(fp32 || model), top-1 agreement, and the ratio of QAT's perplexity increase to PTQ's.

Not group 32 asymmetric: the demo's weights were stored on that grid (a meaningless result).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowbit import api, qat
from lowbit.eval import format_table
from lowbit.eval.metrics import kl_per_token, token_nll, top1_match
from lowbit.presets import get_preset
from lowbit.scheme import with_group_size


@torch.inference_mode()
def scores(models: dict[str, torch.nn.Module], baseline: torch.nn.Module, windows: torch.Tensor) -> list[dict]:
    """Per model: perplexity, KL(baseline || model) and top-1 agreement; the baseline runs once per window."""
    sums = {name: [0.0, 0.0, 0] for name in ["fp32", *models]}
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        base = baseline(input_ids=ids, use_cache=False).logits
        sums["fp32"][0] += token_nll(base, ids).double().sum().item()
        for name, model in models.items():
            logits = model(input_ids=ids, use_cache=False).logits
            sums[name][0] += token_nll(logits, ids).double().sum().item()
            sums[name][1] += kl_per_token(base, logits).double().sum().item()
            sums[name][2] += int(top1_match(base, logits).sum().item())
    n = windows.shape[0] * (windows.shape[1] - 1)
    ppl_fp = float(torch.tensor(sums["fp32"][0] / n).exp())
    rows = []
    for name, (nll, kl, agree) in sums.items():
        ppl = float(torch.tensor(nll / n).exp())
        rows.append({"model": name, "ppl": ppl, "change": ppl / ppl_fp - 1, "kl": kl / n, "top1": agree / n})
    rows[0].update(kl=None, top1=None)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=16, help="held-out evaluation windows of 512 tokens")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="default: lowbit's for --lr-unit")
    ap.add_argument("--lr-unit", choices=("grid", "absolute"), default="grid")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant")
    ap.add_argument("--lsq", action="store_true")
    ap.add_argument("--scales-only", action="store_true", help="keep the codes, learn the scales (implies --lsq)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ptq", default=None, help="reuse this w4a16 checkpoint (e.g. a previous run's) as the start")
    args = ap.parse_args()

    original, tok = api.load_model("demo")
    recipe = with_group_size(get_preset("w4a16"), args.group_size)
    work = Path(tempfile.mkdtemp(prefix="lowbit-qat-bench-"))
    start = time.perf_counter()
    if args.ptq is None:
        calib = api.calibration_samples(tok, "demo", n_samples=args.samples, seq_len=512, seed=0)
        model, _ = api.load_model("demo")
        report = api.quantize(model, recipe, calib, progress=False)
        ptq = api.save_quantized(model, tok, work / "ptq", report)
        del model
    else:
        ptq = Path(args.ptq)
    ptq_seconds = time.perf_counter() - start
    print(f"PTQ {recipe.name} in {ptq}: {ptq_seconds:.0f} s", file=sys.stderr, flush=True)

    config = qat.QATConfig(
        steps=args.steps,
        lr=args.lr,
        lr_unit=args.lr_unit,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        save_every=0,
        lsq=args.lsq or args.scales_only,
        train_weights=not args.scales_only,
    )
    result = qat.train("demo", None, "demo", work / "qat", config, start=ptq, progress=True)
    losses = result.losses
    print(f"QAT: {result.seconds:.0f} s, loss {losses[0]:.4f} at step 1, {sum(losses[-10:]) / 10:.4f} over the "
          f"last 10", file=sys.stderr, flush=True)  # fmt: skip

    windows = api.eval_windows(tok, "demo", seq_len=512, n_windows=args.windows)
    models = {"ptq": api.load_quantized(ptq)[0], "qat": api.load_quantized(result.out)[0]}
    rows = scores(models, original, windows)
    made = f"{args.samples}x512 calib, {ptq_seconds:.0f} s" if args.ptq is None else f"from {args.ptq}"
    rows[1]["what"] = f"{recipe.name} (GPTQ), {made}"
    lsq = " scales only (LSQ)" if args.scales_only else " + LSQ" if args.lsq else ""
    rows[2]["what"] = (
        f"QAT{lsq} from it: {args.steps} steps x {args.batch_size}x{args.seq_len} tokens, lr {config.learning_rate:g} "
        f"({args.lr_unit}, {args.lr_schedule}), "
        f"{result.seconds:.0f} s"
    )
    print(f"\nSmolLM2-135M-Instruct, {windows.shape[0]} x 512 held-out tokens (Shakespeare eval split), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    columns = [
        ("model", "model"),
        ("ppl", "perplexity"),
        ("change", "change", "+.2%"),
        ("kl", "KL", ".4f"),
        ("top1", "top-1", ".2%"),
        ("what", "what"),
    ]
    print(format_table(rows, columns))  # type: ignore[arg-type]
    ratio = rows[2]["change"] / rows[1]["change"] if rows[1]["change"] else float("nan")
    kl_ratio = rows[2]["kl"] / rows[1]["kl"] if rows[1]["kl"] else float("nan")
    print(f"perplexity increase QAT / PTQ: {ratio:.3f}; KL QAT / PTQ: {kl_ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
