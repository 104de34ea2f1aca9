"""Produce the README's demo block: run the README's main command (`lowbit quantize`, no
arguments) and put what it printed between the README's demo-output markers.

    python scripts/readme_demo.py            # run, then rewrite the block in README.md
    python scripts/readme_demo.py --check    # run, and say whether README.md matches (exit 1 if not)

The numbers are deterministic for a given thread count (the block shows it); the timings are
this machine's. The comparison in --check skips the lines that hold times.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- demo-output:start -->", "<!-- demo-output:end -->"
TIMED = re.compile(r"(seconds|eval s)")


def run_demo() -> str:
    proc = subprocess.run(["lowbit", "quantize"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"lowbit quantize failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout.rstrip("\n")


def _untimed(block: str) -> list[str]:
    """The block's lines without timings (the table's last column is the evaluation time)."""
    lines = []
    for line in block.splitlines():
        if TIMED.search(line) and ":" in line:
            continue
        lines.append(re.sub(r"\s+[\d.]+$", "", line) if line.startswith(("baseline", "quantized")) else line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with README.md instead of rewriting it")
    args = parser.parse_args()
    text = README.read_text()
    if START not in text or END not in text:
        sys.exit(f"{README} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    old, tail = rest.split(END, 1)
    output = run_demo()
    if args.check:
        old_block = old.strip().removeprefix("```").removesuffix("```").strip("\n")
        same = _untimed(old_block) == _untimed(output)
        print(output)
        print("README.md matches" if same else "README.md differs from this run")
        return 0 if same else 1
    README.write_text(f"{head}{START}\n```\n{output}\n```\n{END}{tail}")
    print(output)
    print(f"wrote the demo block of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
