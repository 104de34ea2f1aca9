"""AdaRound's block reconstruction on the demo model's first blocks: each block's loss before and
after (GPTQ's codes as the start), for trying learning rates, step counts and token cuts cheaply.

    python bench/adaround_blocks.py [--blocks 3] [--samples 4] [--seq-len 128] [--preset w4a16-ar]
                                    [--set iters=100 --set lr=0.1 --set tokens=128] [--threads N]

Only the first ``--blocks`` blocks are quantized (groups of 64); the rest of the model only runs
forward. A line per block: ``loss start -> end``, the share of codes flipped, whether the
result was reverted (its loss on the report batches above the start's, so GPTQ's codes stay) and
the step's seconds on that block; then the whole run's seconds (load, GPTQ, float passes too).

``--undecided``: also the share of the block's weights still undecided (``h(V)`` strictly between
0 and 1, so the step can still move them) every 20 steps, for judging how many steps a schedule
needs. On blocks 0-1, 16 x 512 calibration, the defaults, for w4a16-ar, w3a16-ar and w2a16-ar:
58-64% after the 40 warm-up steps, 5-12% twenty steps later and at most 0.3% from step 180.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from learned_rounding import parse_sets, recipe_for  # bench/ is on the path when a bench script runs

import lowbit.algorithms.softround as softround
from lowbit import api

EVERY = 20


Counts = list[tuple[int, int]]  # per step: (weights with 0 < h(V) < 1, weights)


@contextmanager
def undecided_counts(blocks: list[list[Counts]]) -> Iterator[None]:
    """While open, ``blocks`` gets a list per block that trains, holding one ``Counts`` per
    rounding variable ``V``. A block's variables all first appear in its first forward, before any
    of them appears again, so a new ``V`` after a repeat starts the next block."""
    original = softround.SoftParts.of
    repeated = True  # the next new V starts a block

    def of(v: torch.Tensor) -> softround.SoftParts:
        nonlocal repeated
        parts = original(v)
        counts: Counts | None = getattr(v, "_undecided", None)
        if counts is None:
            if repeated:
                blocks.append([])
            counts = v._undecided = []  # type: ignore[attr-defined]
            blocks[-1].append(counts)
        repeated = bool(counts)
        counts.append((int((parts.dh > 0).sum()), parts.dh.numel()))
        return parts

    softround.SoftParts.of = of  # type: ignore[method-assign]
    try:
        yield
    finally:
        softround.SoftParts.of = original  # type: ignore[method-assign]


def undecided_line(block: list[Counts]) -> str:
    """The block's share of undecided weights every ``EVERY`` steps and at its last step."""
    steps = min(len(c) for c in block)
    shares = [sum(c[i][0] for c in block) / sum(c[i][1] for c in block) for i in [*range(0, steps, EVERY), steps - 1]]
    return f"  undecided every {EVERY} steps: " + " ".join(f"{v:.3f}" for v in shares)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--preset", default="w4a16-ar")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for the learned-rounding step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--undecided", action="store_true", help="print the share of undecided weights per block")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_sets(args.set)
    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=args.samples, seq_len=args.seq_len, seed=0)
    recipe = recipe_for(args.preset, 64, overrides)
    targets = (r"re:model\.layers\.(" + "|".join(str(i) for i in range(args.blocks)) + r")\..*",)
    recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, targets=targets))
    start = time.perf_counter()
    undecided: list[list[Counts]] = []
    if args.undecided:  # an extra pass over the weights per step: the seconds read higher
        with undecided_counts(undecided):
            report = api.quantize(model, recipe, calib, progress=False)
    else:
        report = api.quantize(model, recipe, calib, progress=False)
    seen: set[str] = set()
    for row in report.layers:
        block, e = row.name.split(".")[2], row.extra
        if block in seen or "recon_loss_start" not in e:
            continue
        seen.add(block)
        print(
            f"block {block}: {e['recon_loss_start']:.4g} -> {e['recon_loss_end']:.4g}, "
            f"flipped {e.get('recon_flipped', 0.0):.3f}, reverted {bool(e.get('recon_reverted'))}, "
            f"{e.get('recon_seconds', 0.0):.1f} s"
        )
        if len(undecided) >= len(seen):  # blocks that trained, in order
            print(undecided_line(undecided[len(seen) - 1]))
    seconds = time.perf_counter() - start
    print(f"{args.samples} x {args.seq_len} calibration tokens, overrides {overrides}, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
