"""Bad inputs, as a user gives them: each row is an input, a fragment of the message lowbit must
print, and the promise that nothing that existed before was changed or lost.

Every row runs in its own copy of a tiny offline world (``tests/world.py``: a saved model, a text
file, a lowbit checkpoint) with the working directory at its root. A row either runs the command
line (``argv``) and expects exit code ``code`` (2: a clear error, no traceback; 0: the run goes on
and ``expect`` is a warning on stderr), or calls Python (``call``) and expects a ``LowbitError``.
After the row, every file that existed before it ran has the same bytes.

The rows are grouped by the part of lowbit that catches them; each group is its own list, so
the groups can grow independently.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from world import CALIB_ARGS, EVAL_ARGS, World, build_world, copy_world, run_cli

import lowbit.models
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Bad:
    id: str
    expect: str  # a fragment of the message (case-insensitive)
    argv: Callable[[World], list[str]] | None = None  # command line, given the world
    call: Callable[[World], Any] | None = None  # or Python that must raise LowbitError
    prepare: Callable[[World], None] | None = None  # damage the world before the row runs
    code: int = 2  # exit code of argv rows; 0 means a warning, not a refusal


def _quantize(w: World, *extra: str) -> list[str]:
    """``lowbit quantize`` of the world's model on its text, small and fast, no evaluation."""
    return ["quantize", str(w.model), "--calib", str(w.text), *CALIB_ARGS, "--no-eval", "--quiet", *extra]


def _write(rel: str, text: str | bytes) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        path = w.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return prepare


def _w(field: str, extra: str = "") -> str:
    """A recipe file: int4 group weights with one more field, and optionally another scheme line."""
    weights = "format: int4, granularity: group" + (f", {field}" if field else "")
    return f"scheme:\n  weights: {{{weights}}}\n" + (f"  {extra}\n" if extra else "")


def _zero_first_norm(w: World) -> None:
    """Layer 0's q/k/v (and so o) see only zeros: their GPTQ Hessians are all zero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w.model)
    model.model.layers[0].input_layernorm.weight.data.zero_()
    model.save_pretrained(w.model)


# --- command line and recipes -----------------------------------------------------------------------
ROWS_RECIPE: list[Bad] = [
    Bad("unknown preset", "unknown preset 'w5a5'", argv=lambda w: _quantize(w, "--preset", "w5a5")),
    Bad(
        "misspelled recipe field",
        "did you mean 'group_size'",
        prepare=_write("r.yaml", "scheme:\n  weights: {format: int4, granularity: group, groupsize: 64}\n"),
        argv=lambda w: _quantize(w, "--recipe", "r.yaml"),
    ),
    Bad("zero samples", "expected a positive integer", argv=lambda w: [*_quantize(w), "--samples", "0"]),
    *(
        Bad(id_, expect, prepare=_write("r.yaml", text), argv=lambda w: _quantize(w, "--recipe", "r.yaml"))
        for id_, expect, text in [
            ("group_size true", "scheme.weights.group_size: expected an integer, got true", _w("group_size: true")),
            ("group_size a string", "group_size: expected an integer, got '64'", _w('group_size: "64"')),
            ("symmetric a string", "symmetric: expected true or false, got 'yes'", _w('symmetric: "yes"')),
            ("observer_args a list", "observer_args: expected a mapping", _w("observer_args: [0.2]")),
            ("group size not dividing", "groups of 64 or 32 divide every targeted width", _w("group_size: 96")),
            ("group size larger than a layer", "groups of 512 are larger than the 128 input", _w("group_size: 512")),
            ("targets match nothing", "'attn.qq_proj' matches no linear layer", _w("", "targets: [attn.qq_proj]")),
            (
                "ignore entry matches nothing (layers listed)",
                "'mlp.nope' matches no linear layer of the model; its linear layers are self_attn.q_proj, "
                "self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, "
                "mlp.down_proj, lm_head (e.g. model.layers.0.self_attn.q_proj)",
                _w("", "ignore: [lm_head, mlp.nope]"),
            ),
            (
                "override regex does not compile",
                "'re:.*(down' is not a valid regular expression",
                _w("", "overrides: [{pattern: 're:.*(down', weights: null}]"),
            ),
            (
                "override pattern matches nothing",
                "'re:.*down_proj_x' matches no linear layer",
                _w("", "overrides: [{pattern: 're:.*down_proj_x', weights: null}]"),
            ),
            ("overrides not a list", "scheme.overrides: expected a list", _w("", "overrides: down_proj")),
            ("override not a mapping", "overrides[0]: expected a mapping", _w("", "overrides: [down_proj]")),
            ("recipe is a YAML list", "expected a mapping", "- preset: w4a16\n"),
            ("recipe is not UTF-8", "is not utf-8 text", b"\xff\xfescheme:\n  weights: {}\n"),
        ]
    ),
]

# --- where output goes ------------------------------------------------------------------------------
_HELD_LOCKS: list[int] = []  # lock files a row's prepare holds while the row runs (closed by the next one)


def _hold_lock(name: str, pid: int) -> Callable[[World], None]:
    """Another writer of ``name``: its lock file held, as lowbit's own lock holds it, recording ``pid``."""

    def prepare(w: World) -> None:
        while _HELD_LOCKS:
            os.close(_HELD_LOCKS.pop())
        fd = os.open(w.root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{pid}\n".encode())
        _HELD_LOCKS.append(fd)

    return prepare


def _remote_code_model(w: World) -> None:
    """``remote/``: a config whose auto_map points at modeling_x.py, which would damage the world's text."""
    remote = w.root / "remote"
    remote.mkdir()
    auto_map = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps({"model_type": "lowbit-remote-x", "auto_map": auto_map}))
    (remote / "modeling_x.py").write_text(f"open({str(w.text)!r}, 'w').write('remote code ran')\n")


def _full_disk(w: World) -> None:
    """Overwrite a copy of the world's checkpoint on a tmpfs too small for a second one (root only)."""
    from lowbit.checkpoint import load_quantized, save_quantized

    disk = w.root / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in w.ckpt.rglob("*") if p.is_file())
    opts = f"size={int(size * 1.5) // 4096 * 4096 + 4096}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        shutil.copytree(w.ckpt, disk / "q")
        model, tok, meta = load_quantized(disk / "q")
        save_quantized(model, tok, disk / "q", {k: v for k, v in meta.items() if k != "layers"}, overwrite=True)
    finally:
        load_quantized(disk / "q")  # the old checkpoint is intact
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _export(w: World, *extra: str) -> list[str]:
    return ["export", str(w.ckpt), "--format", "gptq", "--quiet", *extra]


ROWS_OUTPUT: list[Bad] = [
    Bad("existing --out without --overwrite", "already exists", argv=lambda w: _quantize(w, "--out", str(w.ckpt))),
    Bad(
        "--overwrite onto a directory lowbit did not write",
        "was not written by lowbit",
        prepare=_write("mine/notes.txt", "my notes"),
        argv=lambda w: _quantize(w, "--out", "mine", "--overwrite"),
    ),
    Bad(
        "--overwrite onto the model directory",
        "is the model itself",
        argv=lambda w: _quantize(w, "--out", str(w.model), "--overwrite"),
    ),
    Bad(
        "export --overwrite onto the model directory",
        "was not written by lowbit",
        argv=lambda w: _export(w, "--out", str(w.model), "--overwrite"),
    ),
    Bad(
        "export --overwrite onto a user's directory",
        "will not replace it",
        prepare=_write("exported/readme.txt", "mine"),
        argv=lambda w: _export(w, "--out", "exported", "--overwrite"),
    ),
    Bad("--out .", "is the current directory", argv=lambda w: _quantize(w, "--out", ".", "--overwrite")),
    Bad("--out ..", "is a parent of the current directory", argv=lambda w: _quantize(w, "--out", "..")),
    Bad("--out /", "is the filesystem root", argv=lambda w: _quantize(w, "--out", "/", "--overwrite")),
    Bad("--out ~", "is your home directory", argv=lambda w: _quantize(w, "--out", "~", "--overwrite")),
    Bad("export --out .", "is the current directory", argv=lambda w: _export(w, "--out", ".", "--overwrite")),
    Bad(
        "--out inside the model directory",
        "inside the model's directory",
        argv=lambda w: _quantize(w, "--out", str(w.model / "q")),
    ),
    Bad(
        "export --out inside the checkpoint",
        "inside the model's directory",
        argv=lambda w: _export(w, "--out", str(w.ckpt / "gptq")),
    ),
    Bad("--out under a file", "is a file, not a directory", argv=lambda w: _quantize(w, "--out", "text.txt/q")),
    Bad("--out where nobody may write", "could not write", argv=lambda w: _quantize(w, "--out", "/proc/lowbit/q")),
    Bad(
        "recipe name ../../x",
        "recipe name '../../x' may not contain",
        prepare=_write("r.yaml", "name: ../../x\npreset: w8a16\n"),
        argv=lambda w: _quantize(w, "--recipe", "r.yaml"),
    ),
    Bad(
        "recipe name with a slash",
        "recipe name 'w8/a16' may not contain",
        prepare=_write("r.yaml", "name: w8/a16\npreset: w8a16\n"),
        argv=lambda w: _quantize(w, "--recipe", "r.yaml"),
    ),
    Bad(
        "recipe file named like a hidden file",
        "recipe name '.mine' may not contain",
        prepare=_write(".mine.yaml", "scheme: {weights: {format: int8, granularity: channel}}\n"),
        argv=lambda w: _quantize(w, "--recipe", ".mine.yaml"),
    ),
    Bad(
        "another run writes the same --out",
        "being written by another lowbit run (process 4242",
        prepare=_hold_lock("q", 4242),
        argv=lambda w: _quantize(w, "--out", "q"),
    ),
    Bad(
        "model that wants to run its own code",
        "pass --trust-remote-code",
        prepare=_remote_code_model,
        argv=lambda w: ["quantize", "remote", "--calib", str(w.text), *CALIB_ARGS, "--no-eval", "--out", "q"],
    ),
    Bad(
        "run a model that wants to run its own code",
        "wants to run its own python code",
        prepare=_remote_code_model,
        argv=lambda w: ["run", "remote", "--prompt", "w1 w2"],
    ),
    Bad(
        "leftover temp dir of a killed run",
        "left behind by an interrupted lowbit run",
        prepare=lambda w: (w.root / ".q.4242.abcd1234.lowbit-tmp").mkdir(),
        argv=lambda w: _quantize(w, "--out", "q"),
        code=0,
    ),
    Bad("full disk while saving", "no space left on device", call=_full_disk),
]

# --- models, checkpoints and exports ----------------------------------------------------------------
Q_SCALE = "model.layers.0.self_attn.q_proj.weight_scale"
SHARD = "lowbit-blocks-00000.safetensors"  # decoder block 0's tensors
STALE = f"{SHARD} does not match the SHA-256 recorded in lowbit.json"


def _eval(target: str, *extra: str) -> list[str]:
    return ["eval", target, "--data", "text.txt", *EVAL_ARGS, "--quiet", *extra]


def _checkpoint(preset: str, name: str) -> Callable[[World], None]:
    """Quantize the world's model with ``preset`` (RTN) into ``name``: for damage the w8a16
    checkpoint cannot show (zero points, static activation scales)."""

    def prepare(w: World) -> None:
        argv = ["quantize", str(w.model), "--preset", preset, "--method", "rtn", "--calib", str(w.text)]
        rc, _, err = run_cli([*argv, *CALIB_ARGS, "--no-eval", "--quiet", "--out", name])
        assert rc == 0, err

    return prepare


def _set_tensor(
    ckpt: str, name: str, index: tuple[int, ...], value: float, rehash: bool = False
) -> Callable[[World], None]:
    """Change one value of a checkpoint's tensor; with ``rehash`` also its hash in lowbit.json (an
    edit made on purpose, or damage done before the hashes were computed)."""

    def prepare(w: World) -> None:
        weight_map = json.loads((w.root / ckpt / "lowbit.safetensors.index.json").read_text())["weight_map"]
        path = w.root / ckpt / weight_map[name]
        tensors = load_file(str(path))
        tensors[name][index] = value
        save_file(tensors, str(path), metadata={"format": "pt"})
        if rehash:
            meta_path = w.root / ckpt / "lowbit.json"
            meta = json.loads(meta_path.read_text())
            meta["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            meta_path.write_text(json.dumps(meta))

    return prepare


def _both(*steps: Callable[[World], None]) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        for step in steps:
            step(w)

    return prepare


def _truncate(rel: str) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        path = w.root / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return prepare


def _scribble(rel: str, offset: int) -> Callable[[World], None]:
    """Overwrite 64 bytes of a file at ``offset`` with random bytes."""

    def prepare(w: World) -> None:
        path = w.root / rel
        data = bytearray(path.read_bytes())
        data[offset : offset + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))

    return prepare


def _edit_json(rel: str, change: Callable[[dict[str, Any]], None]) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        path = w.root / rel
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return prepare


def _bad_gguf(drop: str = "", halve: str = "") -> Callable[[World], None]:
    """``bad.gguf``: a 2-block llama declared in the metadata, with tensor ``drop`` left out or
    ``halve`` half as wide as the architecture needs."""

    def prepare(w: World) -> None:
        hidden, ffn, heads, kv, vocab = 64, 128, 4, 2, [b"<unk>", b"<s>", b"</s>", *(b"w%d" % i for i in range(20))]
        writer = gguf.GGUFWriter(str(w.root / "bad.gguf"), "llama")
        writer.add_block_count(2)
        writer.add_context_length(128)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(10000.0)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab)
        writer.add_token_scores([0.0] * len(vocab))
        writer.add_token_types([1] * len(vocab))
        shapes = {"token_embd.weight": (len(vocab), hidden), "output_norm.weight": (hidden,)}
        for i in range(2):
            for t, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                             ("attn_k", (kv * hidden // heads, hidden)), ("attn_v", (kv * hidden // heads, hidden)),
                             ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                             ("ffn_down", (hidden, ffn))):  # fmt: skip
                shapes[f"blk.{i}.{t}.weight"] = shape
        for name, shape in shapes.items():
            if name != drop:
                shape = (*shape[:-1], shape[-1] // 2) if name == halve else shape
                writer.add_tensor(name, np.full(shape, 0.01, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return prepare


ROWS_CHECKPOINT: list[Bad] = [
    Bad("missing model directory", "does not exist", argv=lambda w: ["quantize", "./no-such-model", "--no-eval"]),
    Bad("NaN weight scale: hash", STALE, prepare=_set_tensor("ckpt", Q_SCALE, (3, 0), float("nan")),
        argv=lambda w: _eval("ckpt")),
    Bad("NaN weight scale: --no-verify", f"{Q_SCALE} has 1 NaN value",
        prepare=_set_tensor("ckpt", Q_SCALE, (3, 0), float("nan")), argv=lambda w: _eval("ckpt", "--no-verify")),
    Bad("NaN weight scale: rehashed, run", f"{Q_SCALE} has 1 NaN value",
        prepare=_set_tensor("ckpt", Q_SCALE, (3, 0), float("nan"), rehash=True),
        argv=lambda w: ["run", "ckpt", "--prompt", "w1 w2", "--max-new-tokens", "2", "--quiet"]),
    Bad("zero weight scale", f"{Q_SCALE} has 1 value <= 0", prepare=_set_tensor("ckpt", Q_SCALE, (0, 0), 0.0),
        argv=lambda w: ["bench", "ckpt", "--no-verify", "--quiet", "--paths", "lowbit"]),
    Bad("Inf input scale", "model.layers.1.mlp.down_proj.input_scale has 1 infinite value",
        prepare=_both(_checkpoint("w8a8-static", "static"),
                      _set_tensor("static", "model.layers.1.mlp.down_proj.input_scale", (), float("inf"), True)),
        argv=lambda w: _eval("static")),
    Bad("zero point out of range", "model.layers.0.mlp.up_proj.weight_zero_point has 1 value outside the uint4 code",
        prepare=_both(_checkpoint("w4a16-asym", "asym"),
                      _set_tensor("asym", "model.layers.0.mlp.up_proj.weight_zero_point", (5, 0), 99, True)),
        argv=lambda w: _eval("asym")),
    Bad("NaN in a norm", "model.norm.weight has 1 NaN value",
        prepare=_set_tensor("ckpt", "model.norm.weight", (7,), float("nan")),
        argv=lambda w: _eval("ckpt", "--no-verify")),
    Bad(f"random bytes in {SHARD}", STALE, prepare=_scribble(f"ckpt/{SHARD}", 100_000),
        argv=lambda w: _eval("ckpt")),
    Bad(f"random bytes in the header of {SHARD}", f"{SHARD} is damaged or incomplete",
        prepare=_scribble(f"ckpt/{SHARD}", 8), argv=lambda w: _eval("ckpt", "--no-verify")),
    Bad(f"truncated {SHARD}", STALE, prepare=_truncate(f"ckpt/{SHARD}"),
        argv=lambda w: _eval("ckpt")),
    Bad(f"truncated {SHARD}: --no-verify", f"{SHARD} is damaged or incomplete",
        prepare=_truncate(f"ckpt/{SHARD}"), argv=lambda w: _eval("ckpt", "--no-verify")),
    Bad(f"missing {SHARD}", f"{SHARD} is missing",
        prepare=lambda w: (w.ckpt / SHARD).unlink(), argv=lambda w: _eval("ckpt")),
    Bad("missing lowbit.safetensors.index.json", "lowbit.safetensors.index.json is missing",
        prepare=lambda w: (w.ckpt / "lowbit.safetensors.index.json").unlink(), argv=lambda w: _eval("ckpt")),
    Bad("truncated model.safetensors: quantize", "model/model.safetensors is a damaged safetensors file",
        prepare=_truncate("model/model.safetensors"), argv=lambda w: _quantize(w)),
    Bad("truncated model.safetensors: eval", "has a damaged weight file",
        prepare=_truncate("model/model.safetensors"), argv=lambda w: _eval("model")),
    Bad("model.safetensors of another shape", "do not match the shapes its config.json",
        prepare=lambda w: save_file({**load_file(str(w.model / "model.safetensors")),
                                     "model.norm.weight": torch.ones(7)}, str(w.model / "model.safetensors")),
        argv=lambda w: _quantize(w)),
    Bad("model config.json not JSON", "config.json' is not a valid JSON file",
        prepare=_write("model/config.json", "{not json"), argv=lambda w: _quantize(w)),
    Bad("model config.json without model_type", "should have a `model_type` key in its config.json",
        prepare=_edit_json("model/config.json", lambda c: c.pop("model_type")), argv=lambda w: _quantize(w)),
    Bad("checkpoint config.json edited", "ckpt/config.json does not match the SHA-256",
        prepare=_write("ckpt/config.json", "{not json"), argv=lambda w: _eval("ckpt")),
    Bad("checkpoint config.json not JSON", "ckpt/config.json is not valid JSON",
        prepare=_write("ckpt/config.json", "{not json"), argv=lambda w: _eval("ckpt", "--no-verify")),
    Bad("checkpoint config.json without model_type", "ckpt/config.json has no 'model_type'",
        prepare=_edit_json("ckpt/config.json", lambda c: c.pop("model_type")),
        argv=lambda w: _eval("ckpt", "--no-verify")),
    Bad("lowbit.json not JSON", "lowbit.json is not valid JSON", prepare=_write("ckpt/lowbit.json", '{"layers": '),
        argv=lambda w: _eval("ckpt")),
    Bad("GGUF with a missing tensor", "tensors do not match the 'llama' architecture",
        prepare=_bad_gguf(drop="blk.1.ffn_down.weight"),
        argv=lambda w: ["quantize", "bad.gguf", "--calib", str(w.text), *CALIB_ARGS, "--no-eval", "--quiet"]),
    Bad("GGUF with a mis-shaped tensor", "bad.gguf: its tensors do not match",
        prepare=_bad_gguf(halve="blk.0.attn_q.weight"),
        call=lambda w: lowbit.models.load_model("bad.gguf")),
    Bad("export of a damaged checkpoint", STALE, prepare=_set_tensor("ckpt", Q_SCALE, (3, 0), float("nan")),
        argv=lambda w: ["export", "ckpt", "--format", "gguf", "--out", "x"]),
    Bad("export of a damaged checkpoint: --no-verify", f"{Q_SCALE} has 1 NaN value",
        prepare=_set_tensor("ckpt", Q_SCALE, (3, 0), float("nan")),
        argv=lambda w: ["export", "ckpt", "--format", "gguf", "--out", "x", "--no-verify"]),
    Bad("export of a model with a NaN scale", "cannot export to gguf: model.layers.0.self_attn.q_proj.weight_scale",
        call=lambda w: _export_nan_model(w)),
]  # fmt: skip


def _export_nan_model(w: World) -> None:
    """``export_model`` on an in-memory model whose scale went NaN after loading."""
    from lowbit import api

    model, tok, _ = api.load_quantized(w.ckpt)
    model.get_submodule("model.layers.0.self_attn.q_proj").qweight.scale[0, 0] = torch.nan
    api.export_model(model, tok, "gguf", w.root / "x")


# --- data and numerics --------------------------------------------------------------------------------
ROWS_DATA: list[Bad] = [
    Bad(
        "missing calibration file",
        "text source 'no-such.txt' does not exist",
        argv=lambda w: [*_quantize(w), "--calib", "no-such.txt"],
    ),
    Bad(
        "missing evaluation file",
        "text source 'no-eval.txt' does not exist",
        argv=lambda w: ["quantize", str(w.model), "--calib", str(w.text), *CALIB_ARGS, "--eval-data", "no-eval.txt"],
    ),
    Bad(
        "calibration text too short for distinct windows",
        "only 9 distinct windows of 32 tokens; 16 were requested, so samples repeat",
        prepare=_write("short.txt", " ".join(f"w{i}" for i in range(40))),
        argv=lambda w: [*_quantize(w), "--calib", "short.txt", "--samples", "16", "--out", "short-out"],
        code=0,
    ),
    Bad(
        "empty calibration file",
        "'empty.txt' is an empty file",
        prepare=_write("empty.txt", ""),
        argv=lambda w: [*_quantize(w), "--calib", "empty.txt"],
    ),
    Bad(
        "calibration file of another kind",
        "unsupported text file",
        prepare=_write("calib.csv", "text\nw1 w2\n"),
        argv=lambda w: [*_quantize(w), "--calib", "calib.csv"],
    ),
    Bad(
        "calibration directory without .txt",
        "contains no *.txt files",
        prepare=_write("texts/a.md", "w1 w2"),
        argv=lambda w: [*_quantize(w), "--calib", "texts"],
    ),
    Bad(
        "unparsable datasets name", "cannot parse datasets name", argv=lambda w: [*_quantize(w), "--calib", "wikitext:"]
    ),
    Bad(
        "layer that sees no input (zero Hessian)",
        "model.layers.0.self_attn.q_proj: fallback: rtn (Hessian is all zero: the layer saw no input)",
        prepare=_zero_first_norm,
        argv=lambda w: _quantize(w, "--preset", "w4a16", "--out", "zero-out"),
        code=0,
    ),
]

ROWS = ROWS_RECIPE + ROWS_OUTPUT + ROWS_CHECKPOINT + ROWS_DATA


@pytest.fixture(autouse=True)
def _no_demo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("cache")))

    def refuse() -> Path:
        raise AssertionError("a bad-input row tried to fetch the demo model")

    monkeypatch.setattr(lowbit.models, "fetch_demo_model", refuse)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("template"))


@pytest.fixture
def world(template: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    w = copy_world(template, tmp_path / "world")
    monkeypatch.chdir(w.root)
    yield w


def _snapshot(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_enough_rows() -> None:
    assert len(ROWS) >= 40, len(ROWS)
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Bad, world: World) -> None:
    if row.prepare is not None:
        row.prepare(world)
    before = _snapshot(world.root)
    if row.call is not None:
        with pytest.raises(LowbitError) as exc:
            row.call(world)
        message = str(exc.value)
    else:
        assert row.argv is not None
        rc, _, message = run_cli(row.argv(world))
        assert rc == row.code, message
        assert "Traceback" not in message, message
    assert row.expect.lower() in message.lower(), message
    after = _snapshot(world.root)
    changed = [str(p.relative_to(world.root)) for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"files changed or lost: {changed}"
