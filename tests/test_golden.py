"""Golden outputs: every preset and method writes the same tensors as when the file
``tests/golden/tiny.json`` was recorded (before the block runner replaced the first pipeline).

Regenerate only on purpose, after checking why a number moved:
``python -m tests.test_golden`` from the project root (writes the file). Recorded and checked on one thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.golden import checkpoint_digests, compare, golden_recipes
from lowbit.preflight import fitting_group_size
from lowbit.scheme import with_group_size

try:
    from tiny_models import build, token_ids
except ImportError:  # run as a module from the project root to regenerate
    from tests.tiny_models import build, token_ids

GOLDEN = Path(__file__).parent / "golden" / "tiny.json"
# (architecture, recipe): every recipe on llama; on qwen2 (biases) and gemma3 (sliding windows,
# tied head) the ones whose code paths differ there
CASES = [("llama", name) for name in golden_recipes()] + [
    ("qwen2", "w8a8-osplus"),
    ("qwen2", "w4a16"),
    ("gemma3", "w4a16"),
    ("gemma3", "w8a8-kv8"),
    ("gemma3", "w4a16-awq"),
]


def run_case(arch: str, name: str, out: Path) -> dict[str, str]:
    recipe = golden_recipes()[name]
    model = build(arch)
    g = fitting_group_size(recipe, model)
    if g is not None:
        recipe = with_group_size(recipe, g)
    report = api.quantize(model, recipe, token_ids(8, 32), batch_size=4, progress=False)
    api.save_quantized(model, None, out, report)
    return checkpoint_digests(out)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("arch", "name"), CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_outputs_equal_recorded(arch: str, name: str, tmp_path: Path, one_thread: None) -> None:
    recorded = json.loads(GOLDEN.read_text())[f"{arch}/{name}"]
    diff = compare(recorded, run_case(arch, name, tmp_path / "ckpt"))
    assert not diff, f"{arch}/{name}: {len(diff)} tensors differ from the recording: {diff[:5]}"


def test_compare_reports_a_changed_tensor() -> None:
    assert compare({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["new: c", "changed: b"]


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    results = {}
    for arch, name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            results[f"{arch}/{name}"] = run_case(arch, name, Path(tmp) / "ckpt")
        print(arch, name, len(results[f"{arch}/{name}"]))
    GOLDEN.write_text(json.dumps(results, indent=0, sort_keys=True))
