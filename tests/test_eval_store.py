"""Recovery (lowbit.eval.recovery) against hand-computed values, and evaluation results stored in
the checkpoint (lowbit.eval.store): keys, round trips, refusals, and ``lowbit eval`` writing them."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from world import EVAL_ARGS, World, build_world, run_cli

from lowbit.errors import LowbitError
from lowbit.eval.recovery import recoveries, recovery
from lowbit.eval.store import (
    EVAL_DIR,
    checkpoint_id,
    eval_settings,
    load_result,
    save_result,
    settings_key,
    windows_sha256,
)

# --- recovery -------------------------------------------------------------------------------------


def test_recovery_of_each_kind_by_hand() -> None:
    assert recovery(0.9, 1.0, "higher") == pytest.approx(90.0)
    assert recovery(0.45, 0.5, "higher") == pytest.approx(90.0)
    assert recovery(12.5, 10.0, "lower") == pytest.approx(80.0)  # perplexity 12.5 where the original had 10
    assert recovery(11.0, 10.0, "lower") == pytest.approx(90.909090909)
    assert recovery(8.0, 10.0, "lower") == pytest.approx(125.0)  # better than the original
    assert recovery(0.1, 0.0, "log_lower") == pytest.approx(90.48374180)  # exp(-0.1)
    assert recovery(2.0, 2.0, "log_lower") == pytest.approx(100.0)


def test_recovery_undefined_and_bad_kind() -> None:
    assert recovery(0.5, 0.0, "higher") is None
    assert recovery(0.0, 10.0, "lower") is None
    assert recovery(math.inf, 10.0, "lower") is None
    assert recovery(math.nan, 1.0, "higher") is None
    with pytest.raises(LowbitError, match="higher, lower, log_lower"):
        recovery(1.0, 1.0, "bigger")


def test_recoveries_of_an_eval_result() -> None:
    quantized = {"perplexity": 12.5, "nll": math.log(12.5), "kl": 0.1, "top1_agreement": 0.9, "seconds": 3.0}
    original = {"perplexity": 10.0, "nll": math.log(10.0)}
    got = recoveries(quantized, original)
    assert got == pytest.approx({"perplexity": 80.0, "nll": 80.0, "kl": 90.48374180, "top1_agreement": 90.0})
    # no original perplexity: that recovery is left out; metrics against the original need none
    assert set(recoveries(quantized, {})) == {"kl", "top1_agreement"}
    assert recoveries({"kl": None, "top1_agreement": True}, original) == {}


# --- the store ------------------------------------------------------------------------------------


def _fake_checkpoint(root: Path) -> Path:
    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "lowbit.json").write_text('{"format_version": 2, "layers": {}}')
    return ckpt


WINDOWS = torch.arange(24, dtype=torch.int64).reshape(3, 8)


def test_windows_sha256_is_the_int64_bytes() -> None:
    expected = hashlib.sha256(b"".join(int(v).to_bytes(8, "little", signed=True) for v in range(24))).hexdigest()
    assert windows_sha256(WINDOWS) == expected
    assert windows_sha256(WINDOWS.to(torch.int32)) == expected


def test_settings_and_key(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("x")
    s = eval_settings(str(text), WINDOWS, "demo", 4)
    assert s == {
        "data": str(text.resolve()),
        "windows_sha256": windows_sha256(WINDOWS),
        "n_windows": 3,
        "seq_len": 8,
        "baseline": "demo",
        "batch_size": 4,
    }
    key = settings_key(s)
    canonical = json.dumps(s, sort_keys=True, separators=(",", ":"))
    assert key == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert settings_key(dict(reversed(list(s.items())))) == key  # key order does not matter
    for field, value in [("batch_size", 8), ("baseline", None), ("data", "demo")]:
        assert settings_key({**s, field: value}) != key
    assert settings_key(eval_settings(str(text), WINDOWS + 1, "demo", 4)) != key


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path)
    s = eval_settings("demo", WINDOWS, "demo", 4)
    assert load_result(ckpt, s) is None
    path = save_result(ckpt, s, {"perplexity": 12.5, "kl": 0.1})
    assert path == ckpt / EVAL_DIR / f"{settings_key(s)}.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    record = load_result(ckpt, s)
    assert record is not None
    assert record["metrics"] == {"perplexity": 12.5, "kl": 0.1}
    assert record["settings"] == s and record["checkpoint"] == checkpoint_id(ckpt)
    assert {"lowbit", "torch", "transformers", "python"} <= set(record["versions"])
    assert record["time"].endswith("+00:00")
    assert load_result(ckpt, {**s, "batch_size": 8}) is None  # other settings: another key, nothing there


def test_load_refuses_a_result_of_another_checkpoint_or_a_damaged_file(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path)
    s = eval_settings("demo", WINDOWS, "demo", 4)
    path = save_result(ckpt, s, {"perplexity": 1.0})
    assert path is not None
    (ckpt / "lowbit.json").write_text('{"format_version": 2, "layers": {"x": 1}}')  # quantized again in place
    assert load_result(ckpt, s) is None
    save_result(ckpt, s, {"perplexity": 2.0})
    assert load_result(ckpt, s)["metrics"] == {"perplexity": 2.0}  # type: ignore[index]
    path.write_text("{not json")
    assert load_result(ckpt, s) is None
    path.write_text(json.dumps({"format": 1, "settings": {**s, "n_windows": 9}, "checkpoint": checkpoint_id(ckpt)}))
    assert load_result(ckpt, s) is None  # a record for other settings under this name


def test_not_a_checkpoint_stores_nothing(tmp_path: Path) -> None:
    s = eval_settings("demo", WINDOWS, "demo", 4)
    assert save_result(tmp_path, s, {"perplexity": 1.0}) is None
    assert not (tmp_path / EVAL_DIR).exists()


# --- lowbit eval writes the store ---------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("store"))


def test_lowbit_eval_stores_its_result(world: World, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world.ckpt, ckpt)
    argv = ["eval", str(ckpt), "--baseline", str(world.model), "--data", str(world.text), *EVAL_ARGS]
    rc, out, err = run_cli([*argv, "--json", "--quiet"])
    assert rc == 0, err
    printed = json.loads(out)["eval"][-1]
    stored = list((ckpt / EVAL_DIR).glob("*.json"))
    assert len(stored) == 1
    record = json.loads(stored[0].read_text())
    assert record["metrics"] == {k: v for k, v in printed.items() if k != "model"}
    assert record["settings"]["baseline"] == str(world.model.resolve())
    assert record["settings"]["n_windows"] == 4 and record["settings"]["seq_len"] == 32
    assert stored[0].stem == settings_key(record["settings"])
    # the checkpoint still loads with its hashes checked: eval/ is not one of its files
    rc, _, err = run_cli([*argv, "--quiet"])
    assert rc == 0, err
    assert len(list((ckpt / EVAL_DIR).glob("*.json"))) == 1  # same settings, same key: replaced
    rc, _, err = run_cli([*argv, "--quiet", "--batch-size", "2"])
    assert rc == 0, err
    assert len(list((ckpt / EVAL_DIR).glob("*.json"))) == 2
