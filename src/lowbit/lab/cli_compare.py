"""``lowbit compare``: the command over ``lowbit.lab.compare``, with the terminal's table."""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import LowbitError


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def run_compare(args: argparse.Namespace) -> int:
    from lowbit.lab.results import rich_table
    from lowbit.lab.sweep import compare

    presets, recipes = _names(args.presets), _names(args.recipes)
    if not presets and not recipes:
        raise LowbitError("nothing to compare: give --presets a,b,c and/or --recipes a.yaml,b.yaml")
    doc = compare(
        args.model,
        presets,
        recipes,
        args.out,
        calib=args.calib,
        eval_data=args.eval_data,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len,
        batch_size=args.batch_size,
        group_size=args.group_size,
        max_memory=args.max_memory,
        device=args.device,
        threads=args.threads,
        speed=args.speed,
        ray=args.ray,
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
        generations=args.generations,
        gen_tokens=args.gen_tokens,
        embedding_model=args.embedding_model,
    )
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    from rich.console import Console

    Console(file=sys.stdout, width=max(100, Console().width)).print(rich_table(doc))
    done = ", ".join(f"{j['name']} {j['quantize']}/{j['evaluate']}" for j in doc["jobs"])
    print(f"jobs (checkpoint/evaluation): {done}")
    print(f"wrote {args.out}/results.json, results.csv, results.md, plots/*.png and report.html")
    return 0
