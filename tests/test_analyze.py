"""lowbit analyze: planted outlier channels found and stable, the helpers against hand-computed
values and naive loops, the model left unchanged, and the command writing every file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer, planted_llama, tiny_llama

from lowbit.analysis import AnalyzeOptions, analyze, write_report
from lowbit.analysis.capture import block_linears, capture_stats
from lowbit.analysis.clusters import cluster_loss, cluster_losses, kmeans
from lowbit.analysis.formats_error import fake_quant_acts, fake_quant_weight, format_errors
from lowbit.analysis.mse_vs_kl import VARIANTS, layer_kls, ranks, spearman
from lowbit.analysis.outliers import site_of
from lowbit.analysis.report import PLOTS
from lowbit.analysis.stability import jaccard, top_k_channels
from lowbit.cli import main
from lowbit.errors import LowbitError

PLANTED = [5, 40, 101]
SITES_READING_NORMS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}


def _text(path: Path, seed: int, n_words: int = 3000) -> str:
    rng = random.Random(seed)
    vocab = ["the", "king", "rose", "and", "fell", "of", "night", "sword", "in", "a", "crown", "sea", "wind"]
    path.write_text(" ".join(rng.choice(vocab) for _ in range(n_words)) + "\n")
    return str(path)


def test_helpers_equal_hand_computed_values() -> None:
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard([], []) == 1.0 and jaccard({1}, set()) == 0.0
    assert top_k_channels(torch.tensor([0.5, 3.0, 3.0, 1.0]), 2) == {1, 2}
    assert ranks([10.0, 20.0, 20.0, 30.0]) == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1], [1, 2]) is None and spearman([1], [1]) is None
    assert site_of("model.layers.12.mlp.down_proj") == "mlp.down_proj"


def test_weight_and_activation_grids_equal_naive_loops() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=g)
    got = fake_quant_weight(w, "int8", None)
    for r in range(3):
        scale = w[r].abs().max() / 127.5  # lowbit's symmetric int grid: all 256 levels used (float32 math)
        for c in range(8):
            q = min(max(float(torch.round(w[r, c] / scale)), -128), 127)
            assert float(got[r, c]) == pytest.approx(q * float(scale), rel=1e-6, abs=1e-7)
    x = torch.randn(4, 6, generator=g)
    fp4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    got = fake_quant_acts(x, "fp4_e2m1")
    for t in range(4):
        scale = float(x[t].abs().max()) / 6.0
        for c in range(6):
            v = abs(float(x[t, c])) / scale
            nearest = min(fp4, key=lambda f, v=v: (abs(f - v), fp4.index(f) % 2))  # ties to the even code
            assert abs(float(got[t, c])) == pytest.approx(nearest * scale, rel=1e-5)
    res = format_errors(w, torch.randn(5, 8, generator=g), group_size=4)
    for cell in ("weights_8bit", "weights_4bit", "activations_8bit", "activations_4bit"):
        c = res[cell]
        fmts = [k for k in c if not k.endswith("winner")]
        assert c["output_mse_winner"] == min(fmts, key=lambda f, c=c: c[f]["output_mse"])


def test_clusters_against_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g) * torch.tensor([1.0, 1.0, 8.0, 8.0, 0.5, 0.5])
    cmin, cmax = x.amin(0), x.amax(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    err = 0.0
    for c in range(6):
        sel = labels == labels[c]
        lo, hi = min(float(cmin[sel].min()), 0.0), max(float(cmax[sel].max()), 0.0)
        scale = (hi - lo) / 15
        zp = min(max(round(-lo / scale), 0), 15)
        for t in range(10):
            q = min(max(round(float(x[t, c]) / scale) + zp, 0), 15)
            err += ((q - zp) * scale - float(x[t, c])) ** 2
    assert cluster_loss(x, cmin, cmax, labels, "uint4") == pytest.approx(err / 60, rel=1e-5)
    clumps = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0], [0.1, 0.0], [10.1, 10.0], [-10.0, 5.1]])
    found = kmeans(clumps, 3, seed=0).tolist()
    assert len(set(found)) == 3 and found[:3] == found[3:]
    assert torch.equal(kmeans(clumps, 6), torch.arange(6))
    res = cluster_losses(x, cmin, cmax, [1, 3, 6])
    assert res["by_clusters"][6] == pytest.approx(res["per_channel"])
    assert res["per_channel"] <= res["by_clusters"][3] <= res["by_clusters"][1]


def test_mse_vs_kl_restores_weights_and_hooks_are_removed() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = dict(list(block_linears(model).items())[:3])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    res = layer_kls(model, linears, ids, progress=False)
    assert set(res) == {v.name for v in VARIANTS}
    for d in res.values():
        assert all(r["kl"] > 0 and r["mse"] > 0 for r in d["layers"])
        assert d["spearman"] == spearman([r["mse"] for r in d["layers"]], [r["kl"] for r in d["layers"]])
        for r, name in zip(d["layers"], linears, strict=True):
            assert r["rel_mse"] == pytest.approx(r["mse"] / float((before[name + ".weight"].double() ** 2).mean()))
    capture_stats(model, ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_planted_outlier_channels_found_and_fully_stable(tmp_path: Path) -> None:
    model = planted_llama(PLANTED, factor=20.0)
    calib = _text(tmp_path / "calib.txt", 0)
    domains = (_text(tmp_path / "a.txt", 1), _text(tmp_path / "b.txt", 2))
    opts = AnalyzeOptions(samples=4, seq_len=32, top_k=len(PLANTED), clusters=(1, 2, 4), kl_layers=2, domains=domains)
    result = analyze(model, byte_tokenizer(), calib, opts, progress=False)
    found = {(r["site"], r["channel"]) for r in result["outlier_features"]}
    assert found == {(s, c) for s in SITES_READING_NORMS for c in PLANTED}
    assert all(r["layer_share"] == 1.0 for r in result["outlier_features"])
    for rows in (result["stability_subsets"], *(d["layers"] for d in result["stability_domains"])):
        for r in rows:
            if site_of(r["layer"]) in SITES_READING_NORMS:
                assert r["top_k"] == 1.0 and r["large"] == 1.0, r
    plain = analyze(tiny_llama(), byte_tokenizer(), calib, opts, progress=False)
    assert plain["outlier_features"] == []
    (tmp_path / "rep").mkdir()
    files = write_report(result, tmp_path / "rep")
    assert {f.name for f in files} == {"analysis.json", "analysis.md", *PLOTS}
    summary = json.loads((tmp_path / "rep" / "analysis.json").read_text())["summary"]
    assert summary["n_outlier_features"] == len(SITES_READING_NORMS) * len(PLANTED)
    assert summary["jaccard_subsets_large"]["min"] == 1.0


def test_cli_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "model"
    planted_llama(PLANTED, factor=20.0).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    calib, a, b = (_text(tmp_path / f"{n}.txt", i) for i, n in enumerate(("calib", "a", "b")))
    out = tmp_path / "out"
    argv = [
        "analyze",
        str(model_dir),
        "--calib",
        calib,
        "--out",
        str(out),
        "--domains",
        f"{a},{b}",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--kl-layers",
        "2",
        "--clusters",
        "1,2",
        "--quiet",
    ]
    assert main(argv) == 0
    for name in ("analysis.json", "analysis.md", *PLOTS):
        data = (out / name).read_bytes()
        assert data, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Outlier features" in capsys.readouterr().out
    assert main([*argv[:-1], "--domains", a]) == 2
    assert "at least two" in capsys.readouterr().err
    (model_dir / "lowbit.json").write_text("{}")  # looks like a lowbit checkpoint now
    assert main(argv) == 2
    assert "float model" in capsys.readouterr().err
    with pytest.raises(LowbitError, match="at least 2"):
        analyze(tiny_llama(), byte_tokenizer(), calib, AnalyzeOptions(samples=1), progress=False)
