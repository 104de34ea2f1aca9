"""``lowbit analyze``'s files: ``analysis.json`` (everything), ``analysis.md`` (summary and per-layer
tables) and PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

__all__ = ["PLOTS", "summarize", "write_report"]

PLOTS = ("outliers.png", "stability.png", "formats_error.png", "clusters.png", "mse_vs_kl.png")
_CELLS = ("weights_8bit", "weights_4bit", "activations_8bit", "activations_4bit")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: outlier features, mean/min Jaccard, INT-vs-FP wins, cluster losses
    relative to per-tensor, Spearman per variant."""
    layers = result["layers"]
    wins = {}
    for cell in _CELLS:
        for metric in ("tensor_mse", "output_mse"):
            winners = [row["formats"][cell][f"{metric}_winner"] for row in layers]
            wins[f"{cell}/{metric}"] = {f: winners.count(f) for f in sorted(set(winners))}
    ks = result["settings"]["clusters"]
    rel = {}
    for k in ks:
        vals = [
            r["clusters"]["by_clusters"][k] / r["clusters"]["by_clusters"][ks[0]]
            for r in layers
            if r["clusters"]["by_clusters"][ks[0]] > 0
        ]
        rel[str(k)] = _mean(vals)
    rel["per_channel"] = _mean(
        [
            r["clusters"]["per_channel"] / r["clusters"]["by_clusters"][ks[0]]
            for r in layers
            if r["clusters"]["by_clusters"][ks[0]] > 0
        ]
    )
    subsets = [r["top_k"] for r in result["stability_subsets"]]
    large = [r["large"] for r in result["stability_subsets"] if r["large"] is not None]
    return {
        "n_layers": len(layers),
        "n_outlier_features": len(result["outlier_features"]),
        "outlier_channels": sorted({(r["site"], r["channel"]) for r in result["outlier_features"]}),
        "jaccard_subsets_top_k": {"mean": _mean(subsets), "min": min(subsets) if subsets else None},
        "jaccard_subsets_large": {"mean": _mean(large), "min": min(large) if large else None},
        "jaccard_domains_top_k": [
            {"a": d["a"], "b": d["b"], "mean": _mean([r["top_k"] for r in d["layers"]])}
            for d in result["stability_domains"]
        ],
        "format_wins": wins,
        "cluster_loss_vs_one_cluster": rel,
        "spearman": {v: d["spearman"] for v, d in result["mse_vs_kl"].items()},
        "spearman_relative": {v: d.get("spearman_relative") for v, d in result["mse_vs_kl"].items()},
    }


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def _markdown(result: dict[str, Any], summary: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# lowbit analyze",
        "",
        f"{s['samples']} windows x {s['seq_len']} tokens of `{s['calib']}` (seed {s['seed']}); top-k {s['top_k']}; "
        f"weight groups of {s['group_size']}.",
        "",
        "## Outlier features (LLM.int8(): |x| >= 6 in >= 6% of tokens, in >= 25% of layers)",
        "",
        "| site | channel | layer share | token share | max abs |",
        "|---|---|---|---|---|",
    ]
    for r in result["outlier_features"]:
        lines.append(
            f"| {r['site']} | {r['channel']} | {r['layer_share']:.2f} | {r['token_share']:.3f} | {r['max_abs']:.1f} |"
        )
    if not result["outlier_features"]:
        lines.append("| (none) | | | | |")
    j = summary["jaccard_subsets_top_k"]
    lines += [
        "",
        "## Stability of top-k channels (Jaccard)",
        "",
        f"- disjoint calibration halves: mean {_fmt(j['mean'])}, min {_fmt(j['min'])}",
    ]
    for d in summary["jaccard_domains_top_k"]:
        lines.append(f"- domains {d['a']} vs {d['b']}: mean {_fmt(d['mean'])}")
    lines += [
        "",
        "## INT vs FP (layers won, by tensor MSE and by layer-output MSE)",
        "",
        "| what | tensor MSE | output MSE |",
        "|---|---|---|",
    ]
    for cell in _CELLS:
        w = summary["format_wins"]
        lines.append(f"| {cell} | {w[cell + '/tensor_mse']} | {w[cell + '/output_mse']} |")
    lines += [
        "",
        "## Per-cluster activation ranges (loss relative to one range per tensor, mean over layers)",
        "",
        "| clusters | " + " | ".join(summary["cluster_loss_vs_one_cluster"]) + " |",
        "|---" * (len(summary["cluster_loss_vs_one_cluster"]) + 1) + "|",
        "| relative loss | " + " | ".join(_fmt(v) for v in summary["cluster_loss_vs_one_cluster"].values()) + " |",
    ]
    lines += ["", "## Tensor MSE against the KL of quantizing one layer alone (Spearman)", ""]
    rel = summary["spearman_relative"]
    lines += [f"- {v}: {_fmt(r)} (relative MSE: {_fmt(rel[v])})" for v, r in summary["spearman"].items()]
    lines += [] if summary["spearman"] else ["- (not run)"]
    lines += [
        "",
        "## Per layer",
        "",
        "| layer | max abs | large ch. | top-k J | W8 | W4 | A8 | A4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    jac = {r["layer"]: r["top_k"] for r in result["stability_subsets"]}
    for r in result["layers"]:
        win = [r["formats"][c]["output_mse_winner"] for c in _CELLS]
        lines.append(
            f"| {r['layer']} | {r['max_abs']:.2f} | {len(r['large_channels'])} | {jac[r['layer']]:.2f} | "
            + " | ".join(win)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _plots(result: dict[str, Any], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise LowbitError("lowbit analyze draws plots with matplotlib: pip install 'lowbit[analyze]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    x = list(range(len(layers)))
    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax[0].bar(x, [len(r["large_channels"]) for r in layers])
    ax[0].set_ylabel("channels |x|>=6 in >=6% tokens")
    ax[1].semilogy(x, [max(r["max_abs"], 1e-12) for r in layers], ".-")
    ax[1].set_ylabel("max |x|")
    ax[1].set_xlabel("linear layer (block order)")
    fig.suptitle("outlier features per layer")
    fig.tight_layout()
    fig.savefig(out / "outliers.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(x, [r["top_k"] for r in result["stability_subsets"]], ".-", label="disjoint calibration halves")
    for d in result["stability_domains"]:
        ax.plot(x, [r["top_k"] for r in d["layers"]], ".-", label=f"{Path(d['a']).name} vs {Path(d['b']).name}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(f"Jaccard of top-{result['settings']['top_k']} channels")
    ax.set_xlabel("linear layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for a, cell in zip(axes.flat, _CELLS, strict=True):
        ints, fps = ("int8", "fp8_e4m3") if "8bit" in cell else ("int4", "fp4_e2m1")
        ratio = []
        for r in layers:
            c = r["formats"][cell]
            ratio.append(math.log10(max(c[ints]["output_mse"], 1e-30) / max(c[fps]["output_mse"], 1e-30)))
        a.bar(x, ratio, color=["tab:red" if v > 0 else "tab:blue" for v in ratio])
        a.axhline(0, color="k", lw=0.5)
        a.set_title(f"{cell}: log10(MSE {ints} / MSE {fps}) (>0: FP wins)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "formats_error.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = result["settings"]["clusters"]
    for r in layers[:: max(1, len(layers) // 12)]:
        base = r["clusters"]["by_clusters"][ks[0]] or 1.0
        ax.plot(ks, [r["clusters"]["by_clusters"][k] / base for k in ks], alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clusters of channels (K-means on per-channel min, max)")
    ax.set_ylabel("activation MSE / per-tensor MSE")
    fig.tight_layout()
    fig.savefig(out / "clusters.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for v, d in result["mse_vs_kl"].items():
        rows = [r for r in d["layers"] if r["mse"] > 0 and r["kl"] > 0]
        ax.scatter(
            [r["mse"] for r in rows], [r["kl"] for r in rows], s=10, label=f"{v} (Spearman {_fmt(d['spearman'])})"
        )
    if result["mse_vs_kl"]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("weight MSE")
    ax.set_ylabel("KL when quantized alone (nats/token)")
    fig.tight_layout()
    fig.savefig(out / "mse_vs_kl.png", dpi=90)
    plt.close(fig)


def write_report(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``analysis.json``, ``analysis.md`` and the ``PLOTS`` into ``out``; returns the paths."""
    out = Path(out)
    summary = summarize(result)
    data = {**result, "summary": summary}
    (out / "analysis.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "analysis.md").write_text(_markdown(result, summary))
    _plots(result, out)
    return [out / "analysis.json", out / "analysis.md", *(out / p for p in PLOTS)]
