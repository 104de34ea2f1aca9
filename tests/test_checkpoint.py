"""save_quantized / load_quantized: exact round trips, atomic writes, clear errors on bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import N_LAYERS, tiny_llama, token_ids
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import lowbit.checkpoint as checkpoint
from lowbit import api, durable, outdir
from lowbit.errors import LowbitError
from lowbit.kvcache import KVQuantizer
from lowbit.modules import QuantLinear
from lowbit.packing import packed_nbytes
from lowbit.pipeline import RunReport, quantize_model
from lowbit.presets import get_preset
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantSpec, Recipe, Scheme

PRESETS = ("w8a16", "w4a16", "w4a16-asym", "w3a16", "w2a16", "w8a8", "w8a8-static", "w8a8-fp8",
           "mxfp4", "w6a16-fp6", "kv8")  # fmt: skip
KV_HEAD = "w4g32-kv8-head-static"


def _recipe(name: str) -> Recipe:
    if name == KV_HEAD:
        scheme = Scheme(
            weights=QuantSpec("int4", "group", 32),
            kv_cache=QuantSpec("int8", "head", None, observer="minmax"),
        )
        return Recipe(scheme, name=name)
    return get_preset(name)


def _quantized(name: str, tie: bool = False, model: nn.Module | None = None) -> tuple[nn.Module, RunReport]:
    model = model if model is not None else tiny_llama(tie=tie)
    report = quantize_model(model, _recipe(name), token_ids(4, 16, seed=1), batch_size=4, progress=False)
    return model, report


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=token_ids(2, 20, seed=11), use_cache=False).logits


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(_as_bits(a), _as_bits(b)), what


def _assert_same_model(model: nn.Module, loaded: nn.Module) -> None:
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        _assert_identical(sd[key], sd2[key], key)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    quant2 = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert quant.keys() == quant2.keys()
    for name, m in quant.items():
        m2 = quant2[name]
        assert (m.qweight is None) == (m2.qweight is None)
        if m.qweight is not None and m2.qweight is not None:
            assert m2.qweight.spec == m.qweight.spec
            for field in ("codes", "scale", "zero_point", "g_idx"):
                _assert_identical(getattr(m.qweight, field), getattr(m2.qweight, field), f"{name}.{field}")
            for field in ("outlier_idx", "outlier_weight"):  # OWQ's float columns
                a, b = getattr(m.qweight, field), getattr(m2.qweight, field)
                assert (a is None) == (b is None), f"{name}.{field}"
                if a is not None and b is not None:
                    _assert_identical(a, b, f"{name}.{field}")
        assert (m.act is None) == (m2.act is None)
        if m.act is not None and m2.act is not None:
            assert m2.act.spec == m.act.spec
    kv = {n: m for n, m in model.named_modules() if isinstance(m, KVQuantizer)}
    kv2 = {n: m for n, m in loaded.named_modules() if isinstance(m, KVQuantizer)}
    assert kv.keys() == kv2.keys()
    for name, q in kv.items():
        assert kv2[name].spec == q.spec and kv2[name].enabled and not kv2[name].observing
        assert q.qparams.keys() == kv2[name].qparams.keys()
        for kind, (scale, zp) in q.qparams.items():
            _assert_identical(scale, kv2[name].qparams[kind][0], f"{name}.{kind}_scale")
            _assert_identical(zp, kv2[name].qparams[kind][1], f"{name}.{kind}_zero_point")


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _stored(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, from all its shards."""
    return {k: v for f in checkpoint.weight_files(out) for k, v in load_file(str(f)).items()}


def _file_of(out: Path, name: str) -> Path:
    """The shard that holds tensor ``name`` (from the checkpoint's index)."""
    return out / json.loads((out / checkpoint.INDEX_FILE).read_text())["weight_map"][name]


# ---- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", [*PRESETS, KV_HEAD])
def test_round_trip_is_exact(name: str, tie: bool, tmp_path: Path) -> None:
    model, report = _quantized(name, tie)
    if tie:  # through the API, with the run report as provenance
        out = api.save_quantized(model, None, tmp_path / "q", report)
    else:  # directly, with no provenance at all: the file must still be self-describing
        out = checkpoint.save_quantized(model, None, tmp_path / "q", {})
    assert out == tmp_path / "q"
    loaded, tokenizer, meta = checkpoint.load_quantized(out)
    assert tokenizer is None
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    if tie:
        assert meta["recipe"]["name"] == name and len(meta["report"]["layers"]) == len(report.layers)
    _assert_same_model(model, loaded)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    stored = _stored(out)
    assert ("lm_head.weight" in stored) != tie  # tied weights are stored once
    q_proj = "model.layers.0.self_attn.q_proj"
    assert (f"{q_proj}.weight" in stored) == (name == "kv8")  # quantized weights are stored packed only
    assert (f"{q_proj}.weight_packed" in stored) == (name != "kv8")
    assert torch.equal(_logits(loaded), _logits(model))


def test_kv_quantization_survives_the_round_trip(tmp_path: Path) -> None:
    """The loaded KV-cache model is really quantized (not silently float)."""
    model, _ = _quantized("kv8")
    float_model = tiny_llama()
    out = checkpoint.save_quantized(model, None, tmp_path / "q", {"note": "no scheme here"})
    loaded, _, meta = checkpoint.load_quantized(out)
    assert meta["kv_cache"]["granularity"] == "token" and meta["note"] == "no scheme here"
    assert not torch.allclose(_logits(loaded), _logits(float_model), atol=1e-4)


def test_bfloat16_model_round_trip(tmp_path: Path) -> None:
    model = tiny_llama()
    inv_freq = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
    model = model.to(torch.bfloat16)
    for n, b in inv_freq.items():  # as transformers loads bf16 models: RoPE frequencies stay float32
        module, _, attr = n.rpartition(".")
        setattr(model.get_submodule(module), attr, b)
    model, report = _quantized("w8a8-static", model=model)
    out = api.save_quantized(model, None, tmp_path / "q", report)
    loaded, _, _ = checkpoint.load_quantized(out)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    _assert_same_model(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model))


def _word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(255)} | {"[UNK]": 255}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_tokenizer_is_saved_and_loaded(tmp_path: Path) -> None:
    tok = _word_tokenizer()
    model, report = _quantized("w4a16")
    out = api.save_quantized(model, tok, tmp_path / "q", report)
    _, tok2, _ = checkpoint.load_quantized(out)
    assert tok2 is not None
    assert tok2("w1 w200 zz")["input_ids"] == tok("w1 w200 zz")["input_ids"] == [1, 200, 255]


def test_permuted_g_idx_round_trips(tmp_path: Path) -> None:
    model, report = _quantized(KV_HEAD)
    name = "model.layers.1.mlp.down_proj"
    old = model.get_submodule(name)
    assert isinstance(old, QuantLinear) and old.qweight is not None
    qw = old.qweight
    perm = torch.randperm(qw.shape[1], generator=torch.Generator().manual_seed(0))
    permuted = QuantizedWeight(qw.codes[:, perm], qw.scale, qw.zero_point, qw.g_idx[perm], qw.spec)
    model.set_submodule(name, QuantLinear(permuted, None))
    expected_weight = qw.dequantize()[:, perm]
    assert torch.equal(model.get_submodule(name).weight, expected_weight)
    out = api.save_quantized(model, None, tmp_path / "q", report)
    stored = _stored(out)
    assert [k for k in stored if k.endswith("g_idx")] == [f"{name}.weight_g_idx"]  # default ones are implicit
    loaded, _, _ = checkpoint.load_quantized(out)
    m2 = loaded.get_submodule(name)
    assert isinstance(m2, QuantLinear) and m2.qweight is not None
    assert torch.equal(m2.qweight.g_idx, qw.g_idx[perm])
    assert torch.equal(m2.weight, expected_weight)
    _assert_same_model(model, loaded)
    assert torch.equal(_logits(loaded), _logits(model))


def test_packing_makes_files_smaller(tmp_path: Path) -> None:
    sizes = {}
    for name, bits in (("w8a16", 8), ("w4a16", 4), ("w3a16", 3)):
        model, report = _quantized(name)
        out = api.save_quantized(model, None, tmp_path / name, report)
        sizes[name] = sum(f.stat().st_size for f in checkpoint.weight_files(out))
        stored = _stored(out)
        for m_name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                packed = stored[f"{m_name}.weight_packed"]
                assert packed.dtype == torch.uint8
                assert packed.numel() == packed_nbytes(m.in_features * m.out_features, bits)
    linear_params = N_LAYERS * 128 * (128 + 64 + 64 + 128 + 3 * 256)
    assert sizes["w8a16"] - sizes["w4a16"] > linear_params / 2 * 0.9
    assert sizes["w3a16"] < sizes["w4a16"]


# ---- atomic writes --------------------------------------------------------------------------------


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    model4, report4 = _quantized("w4a16")
    model8, report8 = _quantized("w8a16")
    out = tmp_path / "q"
    api.save_quantized(model4, None, out, report4)
    before = _files(out)
    with pytest.raises(LowbitError, match="already exists"):
        api.save_quantized(model8, None, out, report8)
    with pytest.raises(LowbitError, match="already exists"):
        checkpoint.save_quantized(model8, None, out, {})
    assert _files(out) == before
    api.save_quantized(model8, None, out, report8, overwrite=True)
    assert _files(out) != before
    assert json.loads((out / checkpoint.META_FILE).read_text())["recipe"]["name"] == "w8a16"
    assert _leftovers(tmp_path, {"q"}) == []
    loaded, _, _ = checkpoint.load_quantized(out)
    assert torch.equal(_logits(loaded), _logits(model8))


def test_failed_write_leaves_old_output_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, report = _quantized("w4a16")
    out = tmp_path / "q"
    api.save_quantized(model, None, out, report)
    before = _files(out)

    def broken_save_file(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(durable, "save_file", broken_save_file)
    with pytest.raises(LowbitError, match=r"No space left.*left as it was"):  # no traceback in the CLI
        checkpoint.save_quantized(model, None, out, {}, overwrite=True)
    assert _files(out) == before
    with pytest.raises(LowbitError, match="No space left"):
        checkpoint.save_quantized(model, None, tmp_path / "new", {})
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path, {"q"}) == []
    monkeypatch.undo()
    loaded, _, _ = checkpoint.load_quantized(out)  # the old output still loads
    assert torch.equal(_logits(loaded), _logits(model))


# ---- loading errors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, report = _quantized("w4a16-asym")
    return api.save_quantized(model, None, tmp_path_factory.mktemp("ckpt") / "q", report)


def _damaged_copy(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "damaged"
    out.mkdir()
    for name, data in _files(saved).items():
        (out / name).write_bytes(data)
    return out


def _load_error(path: Path, *fragments: str, verify: bool = True) -> None:
    with pytest.raises(LowbitError) as info:
        checkpoint.load_quantized(path, verify=verify)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_load_without_metadata(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    (out / checkpoint.META_FILE).unlink()
    assert not checkpoint.is_quantized_dir(out)
    _load_error(out, "not a lowbit checkpoint", "lowbit.json")
    _load_error(tmp_path / "nowhere", "not a lowbit checkpoint")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_load_damaged_weights(saved: Path, tmp_path: Path, damage: str) -> None:
    out = _damaged_copy(saved, tmp_path)
    weights = out / checkpoint.block_file(0)
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x07not a safetensors file at all" * 10)
    else:
        weights.unlink()
    _load_error(out, "damaged or incomplete", "quantize again")


def test_load_wrong_format_version(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    meta["format_version"] = 99
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    _load_error(out, "format 99", f"reads {checkpoint.FORMAT_VERSION}")


def test_load_missing_tensor(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight_scale"
    path = _file_of(out, name)
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path))
    _load_error(out, "does not match the SHA-256", checkpoint.block_file(1))
    _load_error(out, "missing tensor", name, verify=False)


def test_load_metadata_disagrees_with_file(saved: Path, tmp_path: Path) -> None:
    """lowbit.json says a layer is symmetric, so its zero points in the file are left over."""
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    meta["layers"]["model.layers.0.self_attn.k_proj"]["weights"]["symmetric"] = True
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    _load_error(out, "does not match", "model.layers.0.self_attn.k_proj.weight_zero_point")


def test_load_missing_float_tensor(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    path = _file_of(out, "model.norm.weight")
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path))
    _load_error(out, "does not match its config", "model.norm.weight", verify=False)


def test_load_layer_the_model_does_not_have(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    meta["layers"]["model.layers.7.mlp.down_proj"] = meta["layers"]["model.layers.0.mlp.down_proj"]
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    _load_error(out, "model.layers.7")


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"shape": [128, 64]}, ("shape [128, 64]", "[128, 128]")),
        ({"weights": {"format": "uint8"}}, ("weight_packed holds 8192 bytes", "16384")),
        ({"weights": {"group_size": 32}}, ("scales (128, 1)", "(128, 4)")),
    ],
    ids=["shape", "bits", "groups"],
)
def test_load_metadata_that_does_not_fit_the_tensors(
    saved: Path, tmp_path: Path, change: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    entry = meta["layers"]["model.layers.0.self_attn.q_proj"]
    for key, value in change.items():
        entry[key] = entry[key] | value if isinstance(value, dict) else value
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    _load_error(out, "model.layers.0.self_attn.q_proj", *fragments)


def test_load_unknown_dtype(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    meta["layers"]["model.layers.0.mlp.up_proj"]["dtype"] = "float17"
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    _load_error(out, "model.layers.0.mlp.up_proj", "float17")


def test_saved_fixture_loads(saved: Path) -> None:
    """The damaged copies above start from a file that does load."""
    loaded, _, meta = checkpoint.load_quantized(saved)
    assert meta["recipe"]["name"] == "w4a16-asym"
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, QuantLinear)


def test_plain_transformers_refuses_a_lowbit_checkpoint(tmp_path: Path) -> None:
    """transformers must not silently load a lowbit directory with randomly initialised linears."""
    model = tiny_llama(tie=True)
    report = quantize_model(model, get_preset("w4a16-asym"), token_ids(2, 16), batch_size=2, progress=False)
    out = api.save_quantized(model, None, tmp_path / "q", report)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


# ---- file hashes (values: test_verify.py) ---------------------------------------------------------


def test_hashes_are_recorded_for_every_file_written(tmp_path: Path) -> None:
    model, report = _quantized("w4a16-asym")
    out = api.save_quantized(model, _word_tokenizer(), tmp_path / "q", report)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    written = {p.name for p in out.iterdir()} - {checkpoint.META_FILE, outdir.MARKER}  # the marker is not data
    shards = {checkpoint.block_file(i) for i in range(N_LAYERS)} | {checkpoint.OUTER_FILE, checkpoint.INDEX_FILE}
    assert set(meta["sha256"]) == written and {"config.json", *shards} <= written
    assert any(name.startswith("tokenizer") for name in written)
    for name, digest in meta["sha256"].items():
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    checkpoint.load_quantized(out)  # and they verify


@pytest.mark.parametrize("name", ["config.json", checkpoint.block_file(0), checkpoint.OUTER_FILE])
def test_changed_or_missing_file_is_named(saved: Path, tmp_path: Path, name: str) -> None:
    out = _damaged_copy(saved, tmp_path)
    if name == "config.json":
        with open(out / name, "a") as f:
            f.write(" ")  # harmless to the parser, caught by the hash
    else:  # the same tensors with other header metadata
        save_file(load_file(str(out / name)), str(out / name), metadata={"edited": "yes"})
    _load_error(out, f"{out / name} does not match the SHA-256", "damaged", "--no-verify")
    checkpoint.load_quantized(out, verify=False)  # the edit was harmless
    (out / name).unlink()
    _load_error(out, f"{out / name} is missing", "damaged")


def test_verify_false_skips_only_the_hash_check(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    path = _file_of(out, name)
    tensors = load_file(str(path))
    tensors[name][3, 0] = float("nan")
    save_file(tensors, str(path))
    _load_error(out, "does not match the SHA-256")
    _load_error(out, f"{name} has 1 NaN value", verify=False)
    from lowbit.verify import hashes_unchecked

    with hashes_unchecked():  # what `lowbit bench --no-verify` uses
        _load_error(out, f"{name} has 1 NaN value")


def test_checkpoint_without_hashes_loads_silently(saved: Path, tmp_path: Path, recwarn: Any) -> None:
    """Checkpoints written before hashes were recorded: nothing to verify, no warning."""
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    del meta["sha256"]
    (out / checkpoint.META_FILE).write_text(json.dumps(meta))
    loaded, _, _ = checkpoint.load_quantized(out)
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, QuantLinear)
    assert not [w for w in recwarn if "lowbit" in str(w.filename)]


def test_malformed_hash_table_is_damage(saved: Path, tmp_path: Path) -> None:
    out = _damaged_copy(saved, tmp_path)
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    for table in ({"../../etc/passwd": "0" * 64}, ["config.json"]):
        meta["sha256"] = table
        (out / checkpoint.META_FILE).write_text(json.dumps(meta))
        _load_error(out, checkpoint.META_FILE, "damaged")
    checkpoint.load_quantized(out, verify=False)
