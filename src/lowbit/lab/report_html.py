"""One self-contained HTML file for a comparison: the results table, the plots (PNG as base64
``data:`` URIs), the jobs, the recipes, versions and machine. It references nothing outside
itself (no scripts, fonts, stylesheets or links), so it opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
from typing import Any

import yaml

from lowbit.lab.plots import PLOT_TITLES
from lowbit.lab.results import cell, table_rows

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; background: #fff; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #eef; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img.plot { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for _, h, _ in columns)
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            cells.append(
                f'<td class="num">{_e(cell(value, fmt))}</td>' if numeric else f"<td>{_e(cell(value, fmt))}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pairs(mapping: dict[str, Any]) -> str:
    rows = [{"k": k, "v": v} for k, v in mapping.items()]
    return _table(rows, [("k", "", ""), ("v", "", "")]).replace("<thead><tr><th></th><th></th></tr></thead>", "")


def _plot(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    title = PLOT_TITLES.get(name, name)
    return (
        f'<figure id="figure-{_e(name)}"><img class="plot" id="plot-{_e(name)}" alt="{_e(title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{_e(title)}</figcaption></figure>'
    )


def render(doc: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The report as one HTML document (a string); ``plots``: name -> PNG bytes."""
    rows, columns = table_rows(doc)
    jobs = _table(doc["jobs"], [("name", "recipe", ""), ("quantize", "checkpoint", ""), ("evaluate", "evaluation", "")])
    recipes = "".join(
        f"<h3>{_e(name)}</h3><pre>{_e(yaml.safe_dump(recipe, sort_keys=False, width=100))}</pre>"
        for name, recipe in doc["recipes"].items()
    )
    settings = {"model": doc["model"], **doc["settings"], **doc["data"]}
    host = {k: v for k, v in doc.get("host", {}).items() if v is not None}
    title = f"lowbit compare: {doc['model']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<h2>Results</h2>",
        "<p>Recovery: the original's perplexity / the quantized model's, and exp(-KL) (the geometric mean of "
        "p_quantized / p_original over the original's predictions), in percent; top-1: how often both models' "
        "most likely next token agree.</p>",
        f'<div id="results">{_table(rows, columns)}</div>',
        "<h2>Plots</h2>",
        *(_plot(name, png) for name, png in plots.items()),
        "<h2>Jobs</h2>",
        jobs,
        "<h2>Settings and data</h2>",
        _pairs(settings),
        "<h2>Recipes</h2>",
        recipes,
        "<h2>Versions</h2>",
        _pairs(doc.get("versions", {})),
        "<h2>Machine</h2>",
        _pairs(host),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
