"""lowbit.generate / lowbit.speed and `lowbit run` / `lowbit bench`: correctness, not timing.

The decoding loop is checked against transformers' ``generate``; byte counts against sums done
by hand from the tiny model's shapes; the commands end to end on a tiny saved checkpoint with
lengths of a few tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import SHAPE, VOCAB, byte_tokenizer, tiny_llama, token_ids
from torch import nn

import lowbit.speed as speed
from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.generate import greedy, prompt_ids, torch_step
from lowbit.kernels import Int4Linear, kernels_available, use_kernels
from lowbit.pipeline import quantize_model
from lowbit.scheme import QuantSpec, Recipe, Scheme

H, I, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
NQ, KV, D = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
LINEAR_PARAMS = L * (2 * NQ * D * H + 2 * KV * D * H + 3 * H * I)  # q, o, k, v, gate, up, down
NORM_PARAMS = (2 * L + 1) * H
W4 = QuantSpec("int4", "group", 32, scale_dtype="float16")


def _quantized(tie: bool = True) -> nn.Module:
    model = tiny_llama(tie=tie)
    quantize_model(model, Recipe(Scheme(weights=W4)), token_ids(4, 16), progress=False)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama(tie=True)
    report = api.quantize(model, Recipe(Scheme(weights=W4), name="w4g32"), token_ids(4, 16), progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "w4"
    api.save_quantized(model, byte_tokenizer(), out, report)
    return out


def test_greedy_matches_transformers_generate() -> None:
    model = _quantized()
    ids = token_ids(2, 7, seed=3)
    new, timing = greedy(torch_step(model), ids, 6)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(new, ref[:, 7:])
    assert (timing.batch, timing.prompt_len, timing.steps) == (2, 7, 5)


def test_greedy_stops_when_every_sequence_has_ended() -> None:
    calls = []

    def step(ids: torch.Tensor, past: int | None) -> tuple[torch.Tensor, int]:
        n = 0 if past is None else past + 1
        calls.append(ids.shape)
        logits = torch.zeros(2, 10)
        logits[0, 9 if n >= 1 else 1] = 1  # sequence 0 ends at its second token
        logits[1, 9 if n >= 3 else 2] = 1  # sequence 1 at its fourth
        return logits, n

    new, timing = greedy(step, torch.zeros(2, 5, dtype=torch.int64), 10, eos={9})
    assert new.tolist() == [[1, 9, 9, 9], [2, 2, 2, 9]]
    assert calls[0] == (2, 5) and all(c == (2, 1) for c in calls[1:]) and timing.steps == 3
    with pytest.raises(LowbitError, match="at least 1"):
        greedy(step, torch.zeros(2, 5, dtype=torch.int64), 0)


def test_prompt_ids_use_the_chat_template_unless_raw() -> None:
    tok = byte_tokenizer()
    assert prompt_ids(tok, "hi").tolist() == [tok("hi")["input_ids"]]
    tok.chat_template = (
        "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    assert prompt_ids(tok, "hi").tolist() == [tok("<hi>:")["input_ids"]]
    assert prompt_ids(tok, "hi", chat=False).tolist() == [tok("hi")["input_ids"]]
    with pytest.raises(LowbitError, match="empty"):
        prompt_ids(tok, "", chat=False)


def test_bytes_read_and_held() -> None:
    model = _quantized(tie=True)
    emb = VOCAB * H  # tied: read by lm_head, held once
    inv_freq = 2 * (D // 2)  # rotary inv_freq and original_inv_freq buffers
    float_read = 4 * (LINEAR_PARAMS + NORM_PARAMS + emb + inv_freq)
    assert speed.weight_read_bytes(speed.float_copy(model)) == float_read
    assert speed.weight_read_bytes(model) == float_read  # QuantLinear reads its float32 weight
    codes = LINEAR_PARAMS * 1 + 2 * (LINEAR_PARAMS // 32) + 4 * (LINEAR_PARAMS // 32)  # int8 codes, fp16 scales, f32 zp
    g_idx = 8 * L * (6 * H + I)  # one int64 per input column of each linear (o_proj's input is 4 x 32 = H)
    assert speed.resident_bytes(model) == float_read + codes + g_idx
    untied = speed.float_copy(_quantized(tie=False))
    assert speed.weight_read_bytes(untied) == float_read  # the embedding table is not read whole...
    assert speed.resident_bytes(untied) == float_read + 4 * emb  # ...but it is held
    if kernels_available():
        use_kernels(model)
        packed = sum(
            m.packed.numel() + 2 * m.scales_zeros.numel() for m in model.modules() if isinstance(m, Int4Linear)
        )
        assert packed == LINEAR_PARAMS // 2 + 2 * 2 * LINEAR_PARAMS // 32  # int4 codes; bf16 scale + offset
        assert speed.weight_read_bytes(model) == packed + 2 * (NORM_PARAMS + emb) + 4 * inv_freq


def test_kv_bytes_per_position() -> None:
    assert speed.kv_bytes_per_position(tiny_llama().config, 2) == 2 * L * KV * D * 2


def test_onnx_weight_bytes_leave_out_embedding_lookups(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(torch.zeros(10, 4).numpy(), "table")
    w = numpy_helper.from_array(torch.zeros(4, 6).numpy(), "w")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [table, w],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert speed.onnx_weight_bytes(tmp_path / "m.onnx") == (4 * 24, 4 * (24 + 40))


def _settings(**kw: object) -> speed.BenchSettings:
    base: dict[str, object] = {"prompt_len": 4, "new_tokens": 2, "batches": (1, 2), "threads": 1}
    return speed.BenchSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_bench_end_to_end(checkpoint: Path) -> None:
    result = speed.bench(str(checkpoint), _settings(paths=("fp32", "lowbit", "kernels", "onnxruntime")))
    measured = {r["path"] for r in result.rows}
    assert {"fp32", "lowbit"} <= measured
    assert measured | set(result.skipped) == {"fp32", "lowbit", "kernels", "onnxruntime"}
    assert not measured & set(result.skipped)
    for r in result.rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["of_bound"] > 0
        assert r["bound_tok_s"] == pytest.approx(r["batch"] * result.bandwidth / (r["read_mb_per_step"] * 1e6))
        if r["path"] == "fp32":
            assert r["decode_x_fp32"] == 1.0
    by = {(r["path"], r["batch"]): r for r in result.rows}
    assert by[("fp32", 1)]["read_mb_per_step"] == by[("lowbit", 1)]["read_mb_per_step"]
    if "kernels" in measured:
        assert by[("kernels", 1)]["read_mb_per_step"] < by[("fp32", 1)]["read_mb_per_step"] / 2
    text = speed.format_bench(result)
    assert "decode tok/s" in text and "bound tok/s" in text
    json.dumps(result.to_dict())


def test_bench_skips_onnx_with_the_reason(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.export

    def refuse(*args: object, **kwargs: object) -> None:
        raise LowbitError("onnx cannot hold this layer")

    monkeypatch.setattr(lowbit.export, "export_model", refuse)
    result = speed.bench(str(checkpoint), _settings(paths=("lowbit", "onnxruntime"), batches=(1,)))
    assert result.skipped == {"onnxruntime": "LowbitError: onnx cannot hold this layer"}
    assert [r["path"] for r in result.rows] == ["lowbit"]
    assert result.rows[0]["decode_x_fp32"] is None  # no fp32 path to compare with
    assert "onnxruntime: skipped (LowbitError: onnx cannot hold this layer)" in speed.format_bench(result)


def test_bench_settings_are_checked() -> None:
    with pytest.raises(LowbitError, match="unknown path"):
        _settings(paths=("fp32", "tensorrt")).check()
    with pytest.raises(LowbitError, match="prompt_len"):
        _settings(prompt_len=0).check()


def test_run_command(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tok = api.load_any(str(checkpoint))
    ids = tok("hello", return_tensors="pt")["input_ids"]
    ref, _ = greedy(torch_step(model), ids, 5, {tok.eos_token_id})
    assert main(["run", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "5", "--no-kernels"]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(ref[0].tolist(), skip_special_tokens=True) + "\n"
    assert "tok/s" in out.err and "float32 reference" in out.err
    if kernels_available():
        # on by default where the kernels take some layer
        assert main(["run", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "5", "--raw"]) == 0
        assert "14 int4 layers" in capsys.readouterr().err


def test_run_without_tokenizer_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_llama()
    report = api.quantize(model, Recipe(Scheme(weights=W4)), token_ids(2, 8), progress=False)
    api.save_quantized(model, None, tmp_path / "notok", report)
    assert main(["run", str(tmp_path / "notok"), "--prompt", "hi"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_bench_command_json(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", str(checkpoint), "--prompt-len", "3", "--new-tokens", "2", "--batch", "1", "--threads", "1"]
    assert main([*argv, "--paths", "fp32,lowbit", "--json", "--quiet"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in data["rows"]] == ["fp32", "lowbit"] and data["bandwidth_gb_s"] > 0
    assert main([*argv, "--batch", "1,x"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_float_copy_is_the_dequantized_model_without_quantizers() -> None:
    model = _quantized()
    fc = speed.float_copy(model)
    assert not any(type(m).__name__ == "QuantLinear" for m in fc.modules())
    with torch.no_grad():
        ids = token_ids(1, 9)
        torch.testing.assert_close(fc(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
