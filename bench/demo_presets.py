"""Side by side: several presets on the demo model, evaluated against the fp32 original.

    python bench/demo_presets.py [--presets w8a16,w4a16,w3a16:rtn,...] [--samples 8] [--windows 16]

``PRESET:STEP+STEP`` runs a preset's scheme with other recipe steps (``w3a16:rtn`` is w3a16
rounded to nearest instead of GPTQ, ``w8a8-static:smoothquant+rtn`` adds SmoothQuant, and
``w8a8:zeroquant(steps=20)`` passes parameters), so methods compare on the same scheme.

Prints perplexity, its change, KL(original || quantized), top-1 agreement and bits per weight
for each preset, all on the same held-out windows in one run. The demo model's weights were
stored on a 4-bit group-32 grid with a float minimum, so `w4a16-g32` nearly reproduces them: it
is printed as a check of the pipeline (KL near 0), not as a quality result.

lowbit quantizes whole groups only, and the demo's 576-wide layers are not whole groups of 128:
presets in groups of 128 run here in groups of ``--group-size`` (64) and are named ``...@g64``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import yaml

from lowbit import api
from lowbit.eval import format_table
from lowbit.scheme import Recipe, Step

DEFAULT = (
    "w8a16,w8a8,w8a8-static,w8a8-fp8,w4a16-rtn,w4a16,w4a16-asym,w4a8,w3a16:rtn,w3a16,w4a16-ch,w4a16-owq,"
    "mxfp4,w6a16-fp6,kv8,w4a16-g32"
)


def whole_groups(recipe: Recipe, group_size: int, width: int = 576) -> Recipe:
    """``recipe`` in groups of ``group_size`` if its groups do not divide the demo's ``width``."""
    w = recipe.scheme.weights
    if w is None or w.granularity != "group" or w.group_size is None or width % w.group_size == 0:
        return recipe
    scheme = dataclasses.replace(recipe.scheme, weights=dataclasses.replace(w, group_size=group_size))
    return dataclasses.replace(recipe, scheme=scheme, name=f"{recipe.name}@g{group_size}")


def _step(text: str) -> Step:
    """``gptq`` or ``zeroquant(steps=20,lr=3e-5)``: a recipe step with optional parameters."""
    name, _, rest = text.partition("(")
    params = {}
    for item in filter(None, rest.rstrip(")").split(",")):
        key, _, value = item.partition("=")
        try:
            params[key.strip()] = json.loads(value)  # numbers (3e-5), true/false
        except json.JSONDecodeError:
            params[key.strip()] = yaml.safe_load(value)
    return Step(name.strip(), params)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=DEFAULT)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64, help="for presets whose groups do not divide 576")
    args = ap.parse_args()

    original, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=args.samples, seq_len=args.seq_len, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=512, n_windows=args.windows)
    rows = []
    for name in args.presets.split(","):
        preset, _, steps = name.partition(":")
        recipe = api.resolve_recipe(preset)
        if steps:
            chosen = tuple(_step(step) for step in steps.split("+"))
            recipe = dataclasses.replace(recipe, steps=chosen, name=name)
        recipe = whole_groups(recipe, args.group_size)
        model = copy.deepcopy(original)
        start = time.perf_counter()
        report = api.quantize(model, recipe, calib, progress=False)
        seconds = time.perf_counter() - start
        res = api.evaluate(model, windows, baseline=original, progress=False)
        base = res.baseline_perplexity or float("nan")
        rows.append(
            {
                "preset": name,
                "scheme": report.recipe.scheme.describe(),
                "method": "+".join(step.name for step in recipe.steps),
                "ppl": res.perplexity,
                "change": res.perplexity / base - 1,
                "kl": res.kl,
                "top1": res.top1_agreement,
                "bpw": api.bits_per_weight(model),
                "seconds": seconds,
            }
        )
        print(f"{name}: ppl {res.perplexity:.3f} (fp32 {base:.3f})", flush=True)
        del model
    print(f"\nSmolLM2-135M-Instruct, {args.samples} x {args.seq_len} calibration tokens, "
          f"{windows.shape[0]} x 512 held-out evaluation tokens, fp32 perplexity {base:.3f}")  # fmt: skip
    columns = [
        ("preset", "preset"),
        ("scheme", "scheme"),
        ("method", "method"),
        ("ppl", "perplexity"),
        ("change", "change", "+.2%"),
        ("kl", "KL", ".4f"),
        ("top1", "top-1", ".2%"),
        ("bpw", "bits/w", ".3f"),
        ("seconds", "quantize s", ".0f"),
    ]
    print(format_table(rows, columns))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
