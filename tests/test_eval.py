from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.errors import LowbitError
from lowbit.eval import EvalResult, evaluate, format_table
from lowbit.eval.metrics import kl_per_token, token_nll, top1_match

VOCAB = 128


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,  # large enough that the output distribution is far from uniform
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def perturbed(model: LlamaForCausalLM) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = other.model.layers[0].mlp.down_proj.weight
        w.add_(0.02 * torch.randn(w.shape, generator=g))
    return other


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (5, 16), generator=g)


def test_self_baseline(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    res = evaluate(model, windows, baseline=model, batch_size=2, progress=False)
    assert isinstance(res, EvalResult)
    assert res.kl is not None and abs(res.kl) < 1e-6
    assert res.top1_agreement == 1.0
    assert (res.n_windows, res.seq_len, res.n_tokens) == (5, 16, 5 * 15)
    assert res.seconds >= 0
    d = res.to_dict()
    assert set(d) == {
        "perplexity",
        "nll",
        "kl",
        "top1_agreement",
        "n_windows",
        "seq_len",
        "n_tokens",
        "seconds",
        "baseline_perplexity",
    }
    assert res.baseline_perplexity == res.perplexity


def test_perplexity_matches_hf_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    with torch.no_grad():
        # HF's loss is the mean over the T-1 predicted tokens of one window; windows are equal length,
        # so the mean of per-window means is the global per-token mean.
        losses = [model(input_ids=w[None], labels=w[None]).loss.double().item() for w in windows]
    expected = sum(losses) / len(losses)
    res = evaluate(model, windows, batch_size=4, progress=False)
    assert res.kl is None and res.top1_agreement is None
    assert res.nll == pytest.approx(expected, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert 1.0 < res.perplexity < 10 * VOCAB


def test_perturbed_model_diverges(model: LlamaForCausalLM, perturbed: LlamaForCausalLM, windows: torch.Tensor) -> None:
    res = evaluate(perturbed, windows, baseline=model, progress=False)
    assert res.kl is not None and res.kl > 1e-4
    assert res.top1_agreement is not None and 0.5 < res.top1_agreement < 1.0


def test_batch_size_does_not_change_results(
    model: LlamaForCausalLM, perturbed: LlamaForCausalLM, windows: torch.Tensor
) -> None:
    a = evaluate(perturbed, windows, baseline=model, batch_size=1, progress=False)
    b = evaluate(perturbed, windows, baseline=model, batch_size=3, progress=True, desc="bs3")
    assert a.nll == pytest.approx(b.nll, rel=1e-6)
    assert a.kl == pytest.approx(b.kl, rel=1e-5, abs=1e-9)
    assert a.top1_agreement == b.top1_agreement
    assert (a.n_tokens, a.n_windows) == (b.n_tokens, b.n_windows)


def test_token_nll_naive() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    out = token_nll(logits.half(), ids)
    assert out.shape == (2, 4) and out.dtype == torch.float32
    for b in range(2):
        for t in range(4):
            row = logits[b, t].half().double()
            expected = math.log(row.exp().sum().item()) - row[ids[b, t + 1]].item()
            assert out[b, t].item() == pytest.approx(expected, rel=1e-5)


def test_kl_per_token_naive() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 6, 11, generator=g) * 3
    other = base + torch.randn(2, 6, 11, generator=g)
    out = kl_per_token(base, other)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    for b in range(2):
        for t in range(5):  # last position is never used
            lb = base[b, t].tolist()
            lm = other[b, t].tolist()
            zb = math.log(sum(math.exp(x) for x in lb))
            zm = math.log(sum(math.exp(x) for x in lm))
            expected = sum(math.exp(xb - zb) * ((xb - zb) - (xm - zm)) for xb, xm in zip(lb, lm, strict=True))
            assert out[b, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert torch.all(kl_per_token(base, base) == 0)


def test_top1_match() -> None:
    base = torch.zeros(1, 4, 3)
    model = torch.zeros(1, 4, 3)
    base[0, :, 1] = 1.0  # base argmax: 1 everywhere
    model[0, 0, 1] = model[0, 1, 2] = model[0, 2, 1] = 1.0
    model[0, 3, 0] = 1.0  # last position must be ignored
    assert top1_match(base, model).tolist() == [[True, False, True]]


def test_helper_shape_errors() -> None:
    with pytest.raises(LowbitError, match="differ"):
        kl_per_token(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5))
    with pytest.raises(LowbitError, match="ids shape"):
        token_nll(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(LowbitError, match="seq_len >= 2"):
        top1_match(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.zeros(0, 8, dtype=torch.long), "no evaluation windows"),
        (torch.zeros(8, dtype=torch.long), "2-D"),
        (torch.zeros(2, 3, 4, dtype=torch.long), "2-D"),
        (torch.zeros(2, 8), "integer"),
        (torch.zeros(2, 1, dtype=torch.long), "at least 2"),
        (torch.full((2, 8), VOCAB, dtype=torch.long), "tokenizer"),
        (torch.full((2, 8), -1, dtype=torch.long), "tokenizer"),
        ([[1, 2, 3]], "torch.Tensor"),
    ],
)
def test_bad_windows(model: LlamaForCausalLM, bad: object, match: str) -> None:
    with pytest.raises(LowbitError, match=match):
        evaluate(model, bad, progress=False)  # type: ignore[arg-type]


def test_bad_batch_size(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    with pytest.raises(LowbitError, match="batch_size"):
        evaluate(model, windows, batch_size=0, progress=False)


def test_format_table() -> None:
    rows: list[dict[str, object]] = [
        {"name": "fp16", "ppl": 12.3456, "kl": None, "top1": 1.0, "n": 40},
        {"name": "int4-gptq", "ppl": 1234.56, "kl": 0.0123456, "top1": 0.93125, "n": 7},
        {"name": "int2", "ppl": float("inf"), "top1": 0.5},
    ]
    cols = [
        ("name", "method"),
        ("ppl", "PPL"),
        ("kl", "KL", ".4f"),
        ("top1", "top-1", ".2%"),
        ("n", "windows"),
    ]
    lines = format_table(rows, cols).split("\n")
    assert lines == [
        "method       PPL      KL    top-1  windows",
        "---------  -----  ------  -------  -------",
        "fp16       12.35       -  100.00%       40",
        "int4-gptq   1235  0.0123   93.12%        7",
        "int2         inf       -   50.00%        -",
    ]


def test_format_table_sig_digits_and_errors() -> None:
    out = format_table([{"x": 0.012345}, {"x": 9.99996}, {"x": 123456.7}, {"x": 1e-5}], [("x", "x")])
    assert out.split("\n")[2:] == ["  0.01235", "    10.00", "   123457", "1.000e-05"]
    assert format_table([], [("a", "A")]) == "A\n-"
    with pytest.raises(LowbitError, match="at least one column"):
        format_table([], [])
    with pytest.raises(LowbitError, match="format spec"):
        format_table([{"a": 1.0}], [("a", "A", ".2q")])
