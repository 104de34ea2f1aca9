"""The plots of a comparison, drawn with matplotlib's Agg backend into PNG bytes.

- ``quality``: perplexity and KL against bits per weight (the original's perplexity as a line);
- ``layers``: each recipe's per-layer error from its run report (relative output error on the
  calibration inputs; a data-free recipe's is the weights' relative error, drawn dashed);
- ``quantize_time``: seconds each checkpoint took to make;
- ``decode_speed``: decode tokens/s with torch's CPU kernels against float32 (only with --speed).

The PNGs carry no metadata (matplotlib would write its own name and web address into them).
"""

from __future__ import annotations

import io
from typing import Any

PLOT_TITLES = {
    "quality": "Quality against bits per weight",
    "layers": "Error per layer",
    "quantize_time": "Quantize time",
    "decode_speed": "Decode speed",
}


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _figure(ncols: int = 1, width: float = 6.4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 3.8), squeeze=False)


def quality(doc: dict[str, Any]) -> bytes:
    fig, axes = _figure(2, 10.0)
    rows = [r for r in doc["rows"] if r.get("bits_per_weight") is not None]
    for ax, key, label in ((axes[0][0], "perplexity", "perplexity"), (axes[0][1], "kl", "KL (nats/token)")):
        for r in rows:
            if r.get(key) is not None:
                ax.scatter(r["bits_per_weight"], r[key], s=30)
                ax.annotate(r["name"], (r["bits_per_weight"], r[key]), textcoords="offset points", xytext=(4, 4))
        if key == "perplexity" and doc["original"].get("perplexity") is not None:
            ax.axhline(doc["original"]["perplexity"], color="gray", linestyle="--", label="original")
            ax.legend(loc="best")
        if key == "kl" and any((r.get("kl") or 0) > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(PLOT_TITLES["quality"])
    return _png(fig)


def layers(doc: dict[str, Any]) -> bytes:
    fig, axes = _figure(1, 8.0)
    ax = axes[0][0]
    for name, entries in doc["layers"].items():
        values = [e["rel_error"] for e in entries]
        data_free = bool(entries) and entries[0]["error_on"] == "weights"
        label = f"{name} (weights)" if data_free else name
        ax.plot(range(len(values)), values, linestyle="--" if data_free else "-", marker=".", label=label)
    if any(e["rel_error"] > 0 for entries in doc["layers"].values() for e in entries):
        ax.set_yscale("log")
    ax.set_xlabel("layer (in model order)")
    ax.set_ylabel("relative error")
    ax.set_title(PLOT_TITLES["layers"])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def _bars(names: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> bytes:
    fig, axes = _figure(1, max(4.0, 1.2 * len(names) + 2))
    ax = axes[0][0]
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, values, width=width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(loc="best")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def quantize_time(doc: dict[str, Any]) -> bytes:
    names = [r["name"] for r in doc["rows"]]
    seconds = [doc["timings"]["rows"][n].get("quantize_seconds") or 0.0 for n in names]
    return _bars(names, {"quantize": seconds}, "seconds", PLOT_TITLES["quantize_time"])


def decode_speed(doc: dict[str, Any]) -> bytes:
    names = [r["name"] for r in doc["rows"]]
    t = doc["timings"]["rows"]
    series = {
        "float32": [t[n].get("fp32_tok_s") or 0.0 for n in names],
        "kernels": [t[n].get("kernels_tok_s") or 0.0 for n in names],
    }
    return _bars(names, series, "decode tokens/s (batch 1)", PLOT_TITLES["decode_speed"])


def draw_all(doc: dict[str, Any]) -> dict[str, bytes]:
    """Every plot that ``doc`` has data for: name -> PNG bytes."""
    plots = {"quality": quality(doc), "layers": layers(doc), "quantize_time": quantize_time(doc)}
    if doc["timings"].get("speed"):
        plots["decode_speed"] = decode_speed(doc)
    return plots
