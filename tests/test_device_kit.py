"""``bench/device_kit.py``: a kit carries a model's shape, tokenizer and text to a GPU machine, and
``build`` makes a random-weight model of that shape there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from world import build_world

from lowbit import api

KIT = Path(__file__).resolve().parent.parent / "bench" / "device_kit.py"


def _kit_module():  # bench/ is not a package
    spec = importlib.util.spec_from_file_location("device_kit", KIT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_kit_carries_shape_tokenizer_and_text_and_builds_the_model(tmp_path: Path) -> None:
    kit = _kit_module()
    world = build_world(tmp_path / "world")
    kit.pack(str(world.model), str(world.text), tmp_path / "kit", wheels=False)
    assert not (tmp_path / "kit.partial").exists()
    assert sorted(p.name for p in (tmp_path / "kit").iterdir()) == ["model", "text"]
    assert not list((tmp_path / "kit" / "model").glob("*.safetensors"))  # no weights carried
    kit.build(tmp_path / "kit" / "model", tmp_path / "built")
    built, tok = api.load_model(str(tmp_path / "built"))
    original, original_tok = api.load_model(str(world.model))
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert {k: v.shape for k, v in built.state_dict().items()} == shapes
    assert tok("a b c")["input_ids"] == original_tok("a b c")["input_ids"]
    texts = sorted((tmp_path / "kit" / "text").glob("*.txt"))
    assert texts and world.text.read_text() in {t.read_text() for t in texts}
