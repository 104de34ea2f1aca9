"""Plain-text tables for evaluation results (no external dependency)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from lowbit.errors import LowbitError

__all__ = ["format_number", "format_table"]

MISSING = "-"


def format_number(value: float, sig: int = 4) -> str:
    """Format a float with ``sig`` significant digits in fixed notation where that reads well.

    ``12.3456 -> "12.35"``, ``1234.56 -> "1235"``, ``123456.7 -> "123457"``, ``0.012345 -> "0.01235"``;
    magnitudes >= 1e15 or < 1e-3 use exponent notation; nan/inf print as ``nan``/``inf``/``-inf``.
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    rounded = float(f"{value:.{sig}g}")  # round first so 9.99996 -> 10.00, not 10.000
    mag = abs(rounded)
    if mag < 1e-3 or mag >= 1e15:
        return f"{value:.{sig - 1}e}"
    decimals = max(0, sig - 1 - math.floor(math.log10(mag)))
    return f"{value:.{decimals}f}"


def _cell(value: object, fmt: str | None) -> tuple[str, bool]:
    """Text of one cell and whether it is numeric (right-aligned)."""
    if value is None:
        return MISSING, False
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value), False
    if fmt is not None:
        try:
            return format(value, fmt), True
        except (ValueError, TypeError) as e:
            raise LowbitError(f"cannot format {value!r} with format spec {fmt!r}: {e}") from e
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    return format_number(float(value)), True


def format_table(
    rows: Sequence[dict[str, object]],
    columns: Sequence[tuple[str, str] | tuple[str, str, str]],
) -> str:
    """Render rows as an aligned plain-text table.

    Args:
        rows: one dict per row; keys not in ``columns`` are ignored, absent keys or None show "-".
        columns: ``(key, header)`` or ``(key, header, format_spec)``, e.g. ``("kl", "KL", ".4f")`` or
            ``("top1", "top-1", ".2%")``. Without a spec, ints print as-is and floats with 4
            significant digits (see :func:`format_number`).

    Returns:
        Header line, a dashed rule, then one line per row; columns separated by two spaces, numbers
        right-aligned, text left-aligned, no trailing whitespace, no final newline.
    """
    if not columns:
        raise LowbitError("format_table needs at least one column (key, header).")
    keys, headers, specs = [], [], []
    for col in columns:
        if len(col) not in (2, 3):
            raise LowbitError(f"a column must be (key, header) or (key, header, format_spec), got {col!r}.")
        keys.append(col[0])
        headers.append(col[1])
        specs.append(col[2] if len(col) == 3 else None)

    cells = [[_cell(row.get(k), s) for k, s in zip(keys, specs, strict=True)] for row in rows]
    numeric = [any(row[j][1] for row in cells) for j in range(len(keys))]
    widths = [max([len(h)] + [len(row[j][0]) for row in cells]) for j, h in enumerate(headers)]

    def line(texts: list[str], right: list[bool]) -> str:
        parts = [t.rjust(w) if r else t.ljust(w) for t, w, r in zip(texts, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(headers, numeric), "  ".join("-" * w for w in widths)]
    for row in cells:
        # A number right-aligns; text (including "-") in a numeric column right-aligns too, so it lines up.
        out.append(line([t for t, _ in row], [num or numeric[j] for j, (_, num) in enumerate(row)]))
    return "\n".join(out)
