"""RPTQ: K-means on channel ranges, per-cluster activation quantization, the reorder folded into
blocks (exact on tiny Llama and Qwen2), checkpoints, exporters' refusals, and the demo model."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import byte_tokenizer, planted_llama, tiny_llama, tiny_qwen2, token_ids
from torch import nn
from world import build_world

from lowbit import api, checkpoint
from lowbit.algorithms import build_algorithm
from lowbit.clusters import channel_clusters, cluster_ranges, kmeans
from lowbit.errors import LowbitError
from lowbit.export import EXPORTERS, export_model
from lowbit.golden import checkpoint_digests
from lowbit.job import Job, run_job
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.pipeline import RunOptions, quantize_model
from lowbit.presets import PRESETS, get_preset
from lowbit.primitives import qparams
from lowbit.reorder import ReorderedNorm, head_perms
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step, scheme_from_dict, spec_from_dict, to_dict

A8_C = QuantSpec("uint8", "cluster", None, symmetric=False, clusters=4)
A8_T = QuantSpec("uint8", "tensor", None, symmetric=False)
W8 = QuantSpec("int8", "channel", None, symmetric=True)


# --- K-means against a plain loop -----------------------------------------------------------------


def _reference_kmeans(points: list[list[float]], k: int, seed: int, iters: int) -> tuple[list[int], list[list[float]]]:
    """K-means++ and Lloyd written as plain loops, drawing from the same seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def draw(weights: list[float]) -> int:
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        total = sum(weights)
        if total <= 0:
            return min(int(u * len(weights)), len(weights) - 1)
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if acc / total > u:
                return i
        return len(weights) - 1

    def d2(p: list[float], c: list[float]) -> float:
        return sum((a - b) ** 2 for a, b in zip(p, c, strict=True))

    centers = [list(points[draw([1.0] * len(points))])]
    while len(centers) < k:
        centers.append(list(points[draw([min(d2(p, c) for c in centers) for p in points])]))
    labels = [-1] * len(points)
    for _ in range(iters):
        new = []
        for p in points:
            dists = [d2(p, c) for c in centers]
            new.append(dists.index(min(dists)))
        if new == labels:
            break
        labels = new
        for c in range(k):
            members = [p for p, lab in zip(points, labels, strict=True) if lab == c]
            if members:
                centers[c] = [sum(col) / len(members) for col in zip(*members, strict=True)]
    order = sorted(range(k), key=lambda c: tuple(centers[c]))
    rank = {old: new for new, old in enumerate(order)}
    return [rank[lab] for lab in labels], [centers[c] for c in order]


@pytest.mark.parametrize(("seed", "k"), [(0, 3), (1, 5), (7, 8)])
def test_kmeans_equals_plain_loop_on_exact_points(seed: int, k: int) -> None:
    """Points on a grid of quarters: every sum and mean is exact, so labels and centers match exactly."""
    g = torch.Generator().manual_seed(seed)
    pts = (torch.randint(-40, 40, (60, 2), generator=g).double() / 4).tolist()
    labels, centers = kmeans(torch.tensor(pts), k, seed=seed)
    ref_labels, ref_centers = _reference_kmeans(pts, k, seed, 100)
    assert labels.tolist() == ref_labels
    assert centers.tolist() == ref_centers


def test_kmeans_on_float_points_matches_loop_and_separates_blobs() -> None:
    g = torch.Generator().manual_seed(3)
    blobs = [
        torch.randn(30, 2, generator=g, dtype=torch.float64) * 0.1 + torch.tensor(c, dtype=torch.float64)
        for c in ((-5, 1), (0, 0), (4, 6))
    ]
    pts = torch.cat(blobs)
    labels, _ = kmeans(pts, 3, seed=2)
    assert labels.tolist() == _reference_kmeans(pts.tolist(), 3, 2, 100)[0]
    assert [set(labels[i * 30 : (i + 1) * 30].tolist()) for i in range(3)] == [{0}, {1}, {2}]  # renumbered by center


def test_kmeans_is_seeded_and_checks_its_input() -> None:
    pts = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kmeans(pts, 6, seed=4)[0], kmeans(pts, 6, seed=4)[0])
    with pytest.raises(LowbitError, match="number of clusters"):
        kmeans(pts, 51)
    with pytest.raises(LowbitError, match="NaN"):
        kmeans(torch.tensor([[0.0, float("nan")]]), 1)
    same = torch.zeros(5, 2)  # fewer distinct points than clusters: no NaN, one label
    assert kmeans(same, 3)[0].unique().numel() == 1


def test_cluster_ranges_and_per_cluster_fake_quant_equal_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 24, generator=g) * torch.linspace(0.1, 8, 24)
    lo, hi = x.reshape(-1, 24).amin(0), x.reshape(-1, 24).amax(0)
    labels = channel_clusters(lo, hi, 4)
    c_lo, c_hi = cluster_ranges(lo, hi, labels, 4)
    for c in range(4):
        members = [j for j in range(24) if labels[j] == c]
        assert float(c_lo[c]) == min(float(lo[j]) for j in members)
        assert float(c_hi[c]) == max(float(hi[j]) for j in members)
    act = ActQuantizer(A8_C, labels)
    act.set_range(lo, hi)
    y = act(x)
    for j in range(24):  # each channel quantized with its own cluster's scale and zero point
        c = int(labels[j])
        scale, zp = qparams(c_lo[c], c_hi[c], A8_C.fmt, False)
        q = (torch.round(x[..., j] / scale) + zp).clamp(0, 255)
        assert torch.equal(y[..., j], (q - zp) * scale)


def test_per_cluster_ranges_beat_one_per_tensor_on_outlier_channels() -> None:
    g = torch.Generator().manual_seed(1)
    widths = torch.ones(64)
    widths[[3, 17, 40]] = 30.0  # a few outlier channels, as in LLM activations
    x = torch.randn(512, 64, generator=g) * widths + torch.linspace(-1, 1, 64)
    lo, hi = x.amin(0), x.amax(0)
    per_tensor = ActQuantizer(A8_T)
    per_tensor.set_range(lo.min(), hi.max())
    per_cluster = ActQuantizer(A8_C)
    per_cluster.set_range(lo, hi)  # no clusters given: K-means on (min, max)
    err_t = float((per_tensor(x) - x).pow(2).sum())
    err_c = float((per_cluster(x) - x).pow(2).sum())
    assert err_c < 0.2 * err_t


# --- the spec ---------------------------------------------------------------------------------------


def test_cluster_spec_round_trips_and_is_checked() -> None:
    assert spec_from_dict(to_dict(A8_C), "a") == A8_C
    assert "clusters" not in to_dict(A8_T)  # omitted while unset: older files stay the same
    assert A8_C.describe() == "uint8 4-cluster asym"
    bad = [
        ({"granularity": "cluster"}, "positive integer 'clusters'"),
        ({"granularity": "cluster", "clusters": 4, "dynamic": True}, "static"),
        ({"granularity": "tensor", "clusters": 4}, "needs granularity 'cluster'"),
        ({"granularity": "cluster", "clusters": 4, "observer": "mse"}, "minmax"),
    ]
    for fields, fragment in bad:
        with pytest.raises(LowbitError, match=fragment):
            QuantSpec("uint8", group_size=None, symmetric=False, **fields)
    with pytest.raises(LowbitError, match="weights cannot use granularity 'cluster'"):
        Scheme(weights=QuantSpec("int8", "cluster", None, clusters=2))
    with pytest.raises(LowbitError, match="kv_cache"):
        scheme_from_dict({"kv_cache": to_dict(A8_C)})


# --- the reorder ----------------------------------------------------------------------------------


def test_head_perms_stay_within_heads_and_match_the_gqa_map() -> None:
    heads, kv_heads, hd = 4, 2, 8
    labels = torch.randint(0, 3, (heads * hd,), generator=torch.Generator().manual_seed(0))
    v_perm, o_perm = head_perms(labels, heads, kv_heads, hd)
    for h in range(heads):
        g = h // (heads // kv_heads)
        for d in range(hd):
            # o_proj's new column h*hd+d reads the value channel that v_proj's new row g*hd+d holds
            assert int(o_perm[h * hd + d]) == h * hd + int(v_perm[g * hd + d]) - g * hd
            assert g * hd <= int(v_perm[g * hd + d]) < (g + 1) * hd
    first = labels.reshape(heads, hd)[0][(v_perm[:hd]).tolist()]
    assert bool((first[1:] >= first[:-1]).all())  # clusters contiguous in the group's first head


def _rptq_float(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    """``model`` reordered by RPTQ with its activation quantizers removed afterwards: the float model."""
    scheme = Scheme(input_activations=A8_C)
    quantize_model(model, Recipe(scheme, (Step("rptq"),), "rptq"), calib, batch_size=4, progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act = None
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_reordered_float_model_gives_the_same_outputs(build: Any) -> None:
    ref = build()
    with torch.no_grad():  # give q/k/v biases (Qwen2) and norms non-trivial values
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model = _rptq_float(copy.deepcopy(ref), token_ids(4, 32))
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, ReorderedNorm) and isinstance(
        layer.post_attention_layernorm, ReorderedNorm
    )
    perm = layer.input_layernorm.output_perm
    assert not torch.equal(perm, torch.arange(perm.numel()))  # something moved
    ids = token_ids(2, 24, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_clusters_are_contiguous_after_the_reorder() -> None:
    model = tiny_llama()
    report = quantize_model(model, Recipe(Scheme(input_activations=A8_C), (Step("rptq"),)), token_ids(4, 32),
                            batch_size=4, progress=False)  # fmt: skip
    layer = model.model.layers[1]
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        idx = layer.get_submodule(name).act.cluster_idx
        assert bool((idx[1:] >= idx[:-1]).all()) and int(idx.max()) == 3
    o_idx = layer.self_attn.o_proj.act.cluster_idx.reshape(4, 32)
    assert bool((o_idx[0, 1:] >= o_idx[0, :-1]).all())  # within the first head of the first group
    row = next(r for r in report.layers if r.name.endswith("1.mlp.down_proj"))
    assert row.extra["rptq_clusters"] == 4.0 and row.extra["rptq_contiguous"] == 1.0


def test_rptq_beats_static_per_tensor_on_outlier_channels() -> None:
    """Same int8 weights; the block output errors of per-cluster against per-tensor static activations."""
    calib = token_ids(8, 32)

    def run(acts: QuantSpec, steps: tuple[Step, ...]) -> float:
        model = planted_llama([5, 77], 40.0)
        report = quantize_model(model, Recipe(Scheme(weights=W8, input_activations=acts), steps), calib,
                                batch_size=4, progress=False)  # fmt: skip
        return sum(report.block_errors)

    rptq = run(A8_C, (Step("rptq"), Step("rtn")))
    per_tensor = run(A8_T, (Step("rtn"),))
    assert rptq < 0.5 * per_tensor


def test_rptq_parameters_are_checked() -> None:
    with pytest.raises(LowbitError, match="iters"):
        build_algorithm("rptq", {"iters": 0})
    with pytest.raises(LowbitError, match="seed"):
        build_algorithm("rptq", {"seed": "a"})


# --- presets, checkpoints, exporters -------------------------------------------------------------


def test_presets_are_listed() -> None:
    for name in ("w4a8-rptq", "w8a8-rptq"):
        recipe = get_preset(name)
        assert name in PRESETS and recipe.steps[0].name == "rptq"
        acts = recipe.scheme.input_activations
        assert acts is not None and acts.granularity == "cluster" and not acts.dynamic


@pytest.fixture(scope="module")
def rptq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = tiny_qwen2()
    recipe = get_preset("w4a8-rptq")
    weights = dataclasses.replace(recipe.scheme.weights, group_size=64)
    recipe = dataclasses.replace(recipe, scheme=dataclasses.replace(recipe.scheme, weights=weights))
    report = quantize_model(model, recipe, token_ids(4, 32), batch_size=4, progress=False)
    return model, api.save_quantized(model, byte_tokenizer(), tmp_path_factory.mktemp("rptq") / "ckpt", report)


def test_checkpoint_saves_and_loads_the_same_model(rptq_checkpoint: tuple[nn.Module, Path]) -> None:
    model, path = rptq_checkpoint
    loaded, _, meta = checkpoint.load_quantized(path)
    assert isinstance(loaded.model.layers[1].input_layernorm, ReorderedNorm)
    entry = meta["layers"]["model.layers.0.mlp.down_proj"]["input_activations"]
    assert entry["granularity"] == "cluster" and entry["clusters"] == 32
    q = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.equal(q.act.cluster_idx, model.get_submodule("model.layers.0.mlp.down_proj").act.cluster_idx)
    ids = token_ids(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    res = api.evaluate(loaded, token_ids(2, 32, seed=6), baseline=tiny_qwen2(), progress=False)
    assert res.kl is not None and 0 <= res.kl < 0.1


@pytest.mark.parametrize("fmt", list(EXPORTERS))
def test_every_exporter_refuses_per_cluster_activations(fmt: str, rptq_checkpoint: Any, tmp_path: Path) -> None:
    model, _ = rptq_checkpoint
    with pytest.raises(LowbitError, match=r"cluster|static scale of shape") as err:
        export_model(model, byte_tokenizer(), fmt, tmp_path / fmt)
    assert str(err.value).startswith(f"cannot export to {fmt}")
    assert not (tmp_path / fmt).exists()


# --- the demo model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_rptq_beats_static_per_tensor_activations() -> None:
    """Activation-only W16A8 on the demo (float weights, so only the activation ranges differ):
    8 clusters per activation, reordered, against one static range per tensor."""
    model, tok = api.load_model("demo")
    calib = api.calibration_samples(tok, "demo", n_samples=2, seq_len=128, seed=0)
    windows = api.eval_windows(tok, "demo", seq_len=256, n_windows=2)
    kl = {}
    acts = {"rptq": dataclasses.replace(A8_C, clusters=8), "tensor": A8_T}
    steps = {"rptq": (Step("rptq"),), "tensor": ()}
    for name in ("rptq", "tensor"):
        q = copy.deepcopy(model)
        api.quantize(q, Recipe(Scheme(input_activations=acts[name]), steps[name], name), calib, progress=False)
        kl[name] = api.evaluate(q, windows, baseline=model, progress=False).kl
    assert kl["rptq"] < 0.7 * kl["tensor"], kl


def test_a_streamed_job_writes_the_in_memory_checkpoint(tmp_path: Path) -> None:
    """Read block by block from files, the reordered norms are written and the result equals the
    in-memory run, file for file."""
    world = build_world(tmp_path / "world")
    recipe = get_preset("w8a8-rptq")
    run_job(Job(str(world.model), recipe, tmp_path / "streamed", calib=str(world.text), samples=6, seq_len=32,
                options=RunOptions(batch_size=2, progress=False)))  # fmt: skip
    model, tok = api.load_model(str(world.model))
    calib = api.calibration_samples(tok, str(world.text), n_samples=6, seq_len=32)
    report = api.quantize(model, recipe, calib, batch_size=2, progress=False)
    api.save_quantized(model, tok, tmp_path / "memory", report)
    assert checkpoint_digests(tmp_path / "streamed") == checkpoint_digests(tmp_path / "memory")
