"""The lm-eval adapter: lowbit's model registered as ``lowbit``, its log-likelihoods equal to ones
computed here from the model's logits, and the local tasks (shipped and built from text) run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import SHAPE, byte_tokenizer, token_ids
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import api
from lowbit.errors import LowbitError

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from lowbit.eval.lm_eval_adapter import TASKS_DIR, LowbitLM, continuation_logprob, run_tasks
from lowbit.eval.local_tasks import lastword_items, write_lastword_task

ROOT = Path(__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    """A tiny Llama whose vocabulary also holds the byte tokenizer's end token (id 256)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": 257})).eval()


def _direct_ll(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Sum of log p(cont[j] | ctx + cont[:j]), one position at a time, from the model's logits."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total, greedy = 0.0, True
    for j, tok in enumerate(cont):
        row = logp[len(ctx) + j - 1]
        total += float(row[tok])
        greedy &= int(row.argmax()) == tok
    return total, greedy


def test_registered_and_equal_to_direct_loglikelihoods() -> None:
    assert get_model("lowbit") is LowbitLM
    model, tok = _model(), byte_tokenizer()
    lm = LowbitLM(model=model, tokenizer=tok, batch_size=3, progress=False)
    pairs = [("The cat sat on", " the mat"), ("Hello", " world!"), ("a", "b"), ("", "Start"), ("Rome ", "and")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c_ids, x_ids = tok.encode(ctx.rstrip()), tok.encode(ctx[len(ctx.rstrip()) :] + cont)
        if not ctx:
            c_ids, x_ids = [tok.eos_token_id], tok.encode(cont)
        want_ll, want_greedy = _direct_ll(model, c_ids, x_ids)
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    # rolling: the whole text scored token by token after the prefix (end) token
    text = "To be, or not to be"
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert rolled == pytest.approx(_direct_ll(model, [tok.eos_token_id], tok.encode(text))[0], abs=1e-4)


def test_continuation_logprob_and_greedy_generation() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    ll, greedy = continuation_logprob(logits, [1, 0])
    lse1, lse2 = torch.logsumexp(logits[0], 0), torch.logsumexp(logits[1], 0)
    assert ll == pytest.approx(float(1.0 - lse1 + 2.0 - lse2)) and greedy
    assert continuation_logprob(logits, [0, 0])[1] is False
    model, tok = _model(), byte_tokenizer()
    lm = LowbitLM(model=model, tokenizer=tok, progress=False)
    (text,) = lm.generate_until([Instance("generate_until", {}, ("Hi", {"max_gen_toks": 5, "until": ["\n"]}), 0)])
    ids = torch.tensor([tok.encode("Hi")])
    expected = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert text == tok.decode(expected).split("\n")[0]


def _checkpoint(tmp_path: Path) -> Path:
    model = _model()
    report = api.quantize(model, api.with_method(api.resolve_recipe("w4a16"), "rtn"), token_ids(2, 8), progress=False)
    return api.save_quantized(model, byte_tokenizer(), tmp_path / "ckpt", report)


def test_local_tasks_on_a_checkpoint(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    lm = LowbitLM.create_from_arg_string(f"checkpoint={ckpt},batch_size=4")
    assert lm.batch == 4
    model, tok = api.load_any(str(ckpt))
    res = run_tasks(model, tok, ["lowbit_mc", "lowbit_lastword"], limit=4, progress=False)
    assert set(res) == {"lowbit_mc", "lowbit_lastword"}
    assert 0.0 <= res["lowbit_mc"]["acc"] <= 1.0 and 0.0 <= res["lowbit_mc"]["acc_norm"] <= 1.0
    assert res["lowbit_lastword"]["perplexity"] > 1.0
    # the last-word task's perplexity is exp(-mean ll) of its first 4 items, computed directly
    items = [json.loads(x) for x in (TASKS_DIR / "lowbit_lastword.jsonl").read_text().splitlines()[:4]]
    lls = []
    for it in items:  # truncated on the left to the model's 256 positions, as the adapter does
        cont = tok.encode(" " + it["target"])
        lls.append(_direct_ll(model, (tok.encode(it["context"]) + cont)[-257 : -len(cont)], cont)[0])
    assert res["lowbit_lastword"]["perplexity"] == pytest.approx(float(torch.tensor(lls).mean().neg().exp()), rel=1e-4)


def test_task_built_from_text_and_bad_names(tmp_path: Path) -> None:
    text = ["one two three four five six seven eight nine ten. " * 3 + "The end of the story came swiftly."]
    # sentence ends after 5+ words: "ten." at words 9, 19, 29 and "swiftly." at 36; every second one of them
    item = {"context": "five six seven eight nine", "target": "ten"}
    assert lastword_items(text, 2, context_words=5) == [item, item]
    assert lastword_items(text, 4, context_words=5)[-1] == {"context": "end of the story came", "target": "swiftly"}
    write_lastword_task(text, tmp_path / "tasks", "my_words", n=3, context_words=5)
    res = run_tasks(_model(), byte_tokenizer(), ["my_words"], [tmp_path / "tasks"], progress=False)
    assert res["my_words"]["perplexity"] > 1.0
    with pytest.raises(LowbitError, match="unknown lm-eval task"):
        run_tasks(_model(), byte_tokenizer(), ["no_such_task_xyz"], progress=False, builtin=False)
    with pytest.raises(LowbitError, match="does not exist"):
        run_tasks(_model(), byte_tokenizer(), ["my_words"], [tmp_path / "nowhere"], progress=False)
    with pytest.raises(LowbitError, match="no sentence"):
        lastword_items(["short text."], 2)


def test_lm_eval_finds_lowbit_by_name(tmp_path: Path) -> None:
    """What ``lm_eval --model lowbit --model_args checkpoint=DIR`` does once lowbit is imported
    (``python -m lowbit.lm_eval``): the model by its registered name, built from the argument string."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ckpt = _checkpoint(tmp_path)
    manager = TaskManager(include_path=[str(TASKS_DIR)], include_defaults=False)  # indexing lm-eval's takes a minute
    res = simple_evaluate(
        model="lowbit",
        model_args=f"checkpoint={ckpt}",
        tasks=["lowbit_mc"],
        limit=2,
        task_manager=manager,
        bootstrap_iters=0,
    )
    assert res is not None and "acc,none" in res["results"]["lowbit_mc"]


def test_entry_point_adds_the_example_tasks() -> None:
    from lowbit.lm_eval import with_lowbit_tasks

    base = ["run", "--model", "lowbit", "--tasks", "lowbit_mc"]
    assert with_lowbit_tasks(base, "/T") == [*base, "--include_path", "/T"]
    assert with_lowbit_tasks([*base, "--include_path", "/mine"], "/T") == [*base, "--include_path", "/T:/mine"]
    assert with_lowbit_tasks(["ls", "tasks"], "/T") == ["ls", "tasks"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lowbit.lm_eval", "run", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--model_args" in done.stdout


def test_eval_command_with_tasks_and_generations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    ckpt = _checkpoint(tmp_path)
    base = tmp_path / "base"
    _model().save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon\nThe king\n")
    argv = ["eval", str(ckpt), "--baseline", str(base), "--data", str(data), "--eval-windows", "2",
            "--eval-seq-len", "16", "--generations", str(prompts), "--gen-tokens", "4", "--tasks", "lowbit_mc",
            "--task-limit", "2", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generations"]["n_prompts"] == 2 and out["generations"]["embedding_model"] is None
    assert "lowbit_mc" in out["tasks"]["model"] and "lowbit_mc" in out["tasks"]["baseline"]
    assert main([*argv[:-2], "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "ROUGE-L" in text and "task lowbit_mc (model)" in text and "embedding similarity is left out" in text
    assert main(["eval", str(ckpt), "--data", str(data), "--eval-seq-len", "16", "--generations", str(prompts)]) == 2
    assert "--baseline" in capsys.readouterr().err
