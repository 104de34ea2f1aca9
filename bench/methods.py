"""Issue 14's five methods against their baselines, in one table from one run.

    python bench/methods.py [--quick] [--only rptq,fpq,bcq] [--samples N --seq-len T --windows W --window-len L]
                            [--mofq-blocks B] [--rptq-weights gptq|rtn]

Each method family has its own script (``bench/methods_rptq.py``: RPTQ and MoFQ;
``bench/methods_fpq.py``: Olive and ZeroQuant-FP with LoRC; ``bench/methods_bcq.py``: LUT-GEMM's
BCQ) whose ``rows(quick)`` quantizes the demo model with the method and with its baselines and
evaluates each on the same held-out windows; this script runs them in turn and prints one table.
``--quick`` uses fewer calibration samples and evaluation windows (a smoke run, not a result).
``--samples/--seq-len/--windows/--window-len`` set the calibration and evaluation sizes of every
family at once (default 32 x 512 and 16 x 512; the full quantizers either way); ``--mofq-blocks B``
runs MoFQ's rows on the first B blocks only (its model metric costs two model passes per layer);
``--rptq-weights rtn`` gives RPTQ's rows (and their activation baselines) RTN weights instead of GPTQ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from methods_table import COLUMNS as TABLE_COLUMNS  # bench/ is on the path when a bench script runs

FAMILIES = ("rptq", "fpq", "bcq")
COLUMNS = tuple(c[0] for c in TABLE_COLUMNS)


def _load(name: str) -> Any:
    path = Path(__file__).with_name(f"methods_{name}.py")
    spec = importlib.util.spec_from_file_location(f"methods_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table with the shared columns."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and windows (a smoke run)")
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"families to run, of {','.join(FAMILIES)}")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="their tokens (default 512)")
    parser.add_argument("--windows", type=int, default=16, help="held-out evaluation windows (default 16)")
    parser.add_argument("--window-len", type=int, default=512, help="their tokens (default 512)")
    parser.add_argument("--mofq-blocks", type=int, default=None, help="MoFQ on the first B blocks (0: all)")
    parser.add_argument(
        "--rptq-weights", choices=("gptq", "rtn"), default="gptq", help="the RPTQ rows' weight quantizer (default gptq)"
    )
    args = parser.parse_args()
    sizes = None if args.quick else (args.samples, args.seq_len, args.windows, args.window_len)
    rows: list[dict[str, Any]] = []
    for name in filter(None, args.only.split(",")):
        if name not in FAMILIES:
            parser.error(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
        family = _load(name)
        extra = {"mofq_blocks": args.mofq_blocks, "rptq_weights": args.rptq_weights} if name == "rptq" else {}
        rows += family.rows(args.quick, sizes=sizes, **extra)
        print(table(rows), file=sys.stderr, flush=True)  # progress: the table so far
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
