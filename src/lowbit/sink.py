"""The streaming sink: a checkpoint written one decoder block at a time, resumable after a kill.

The block runner never holds the whole quantized model: it hands each finished block to a
``CheckpointSink``, which writes it at once to its own shard, and the rest of the model
(embeddings, final norm, head) at the end. ``checkpoint.save_quantized`` writes an in-memory model
through the same sink, so there is one writer of the format.

Format 2 (``FORMAT_VERSION``), a directory of:

- ``lowbit-blocks-NNNNN.safetensors``: one shard per decoder block ``NNNNN`` (a block is the unit
  the runner finishes, resumes and hashes; blocks of large models are hundreds of MB to a few GB,
  so no grouping is needed to keep the file count reasonable);
- ``lowbit-outer.safetensors``: every tensor outside the blocks;
- ``lowbit.safetensors.index.json``: ``{"metadata": {"format_version", "total_size"}, "weight_map":
  {tensor: file}}``, as Hugging Face's sharded index (under lowbit's own name, so transformers never
  half-loads the directory);
- ``lowbit.json``: format version, provenance, the ``layers`` table gathered from all blocks, the
  ``kv_cache`` spec and the SHA-256 of every other file (``lowbit.verify``);
- ``config.json`` and the tokenizer files; the ``.lowbit-output`` marker (``lowbit.outdir``).

Tensor names are the state-dict names (``checkpoint.block_tensors``); format 1 held the same tensors
in one ``lowbit.safetensors``, and ``checkpoint.load_quantized`` reads both.

While a run is in progress everything lives in ``.NAME.partial`` next to the output
(``outdir.partial_dir``), with the marker and a manifest ``lowbit-manifest.json``: the run's
fingerprint and, per finished block, its file, size, SHA-256, tensor names, layer entries, KV spec
and the runner's state; plus the latest boundary (the hidden states after a block,
``lowbit-boundary-NNNNN.safetensors``). Every file is written to a temporary name, fsync'd and
renamed, and the manifest (rewritten the same way) is the commit point: a kill at any moment leaves
a manifest that lists only complete files. The output's lock (``outdir.output_lock``) is held from
construction to ``finish`` / ``abort``.

Resuming (``resume=True``) needs an equal fingerprint. It keeps blocks ``0..b``, where ``b`` is the
latest saved boundary (the runner saves it after writing block ``b``): a block written after the
last boundary is dropped, since its successor's inputs are gone with the process. ``finish`` moves
the partial directory into place as the checkpoint (the output's previous version, if any, is
replaced as ``outdir.atomic_dir`` replaces it) and then removes the manifest and boundary from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lowbit.durable import differences, fsync, normalized, save_tensors, unshared, write_json
from lowbit.errors import LowbitError
from lowbit.outdir import (
    TMP_SUFFIX,
    _os_message,
    _say,
    check_free,
    install_dir,
    is_lowbit_output,
    output_lock,
    partial_dir,
    remove_leftovers,
    write_marker,
)
from lowbit.verify import HASH_KEY, file_sha256, hash_files

FORMAT_VERSION = 2
META_FILE = "lowbit.json"
INDEX_FILE = "lowbit.safetensors.index.json"
OUTER_FILE = "lowbit-outer.safetensors"
V1_WEIGHTS_FILE = "lowbit.safetensors"  # format 1: every tensor in one file
MANIFEST_FILE = "lowbit-manifest.json"  # partial runs only
_BLOCK = "lowbit-blocks-{:05d}.safetensors"
_BOUNDARY = "lowbit-boundary-{:05d}.safetensors"
_BLOCK_RE = re.compile(r"lowbit-blocks-\d{5,}\.safetensors")
_BOUNDARY_RE = re.compile(r"lowbit-boundary-\d{5,}\.safetensors")


def block_file(index: int) -> str:
    """The shard of decoder block ``index``."""
    return _BLOCK.format(index)


# ---- the sink ------------------------------------------------------------------------------------


class CheckpointSink:
    """Receives a quantized model block by block and writes a format-2 checkpoint to ``out_dir``.

    ``fingerprint`` describes the run (recipe, model identity, calibration, options); ``resume``
    continues a partial run of the same output only when it is equal. ``overwrite`` allows replacing
    an existing output (one lowbit wrote) at ``finish``, and a partial run whose fingerprint differs.
    Use as a context manager, or call ``abort`` on an exception: the partial directory is kept for
    ``--resume`` (unless ``keep_partial`` is False, as for ``checkpoint.save_quantized``, which has
    nothing to resume).
    """

    keep_partial: bool = True

    def __init__(self, out_dir: str | Path, *, overwrite: bool, resume: bool, fingerprint: dict[str, Any]) -> None:
        self.out = Path(out_dir)
        self.partial = partial_dir(self.out)
        self.overwrite = overwrite
        self._fingerprint = normalized(fingerprint, "the fingerprint")
        self._blocks: dict[int, dict[str, Any]] = {}
        self._boundary: dict[str, Any] | None = None
        self._stack = ExitStack()
        self._open = False
        check_free(self.out, overwrite)
        self._stack.enter_context(output_lock(self.out))
        self._open = True
        try:
            _say(remove_leftovers(self.out))
            check_free(self.out, overwrite)  # again under the lock
            self._start(resume)
        except BaseException:
            self._release()
            raise

    # -- starting or resuming

    def _start(self, resume: bool) -> None:
        p = self.partial
        if not (p.exists() or p.is_symlink()):
            if resume:
                _say([f"no partial run of {self.out} to resume ({p} does not exist); starting from block 0"])
            self._fresh()
            return
        if p.is_symlink() or not p.is_dir() or not is_lowbit_output(p):
            raise LowbitError(
                f"{p} exists and was not written by lowbit, so lowbit will not use or replace it as the partial run "
                f"of {self.out}; move or delete it yourself"
            )
        if not resume:
            _say([f"replaced the partial run in {p} (pass --resume to continue it instead)"])
            self._fresh()
            return
        manifest = self._read_manifest()
        if manifest is None:
            _say([f"the partial run in {p} has no readable {MANIFEST_FILE}; starting again from block 0"])
            self._fresh()
            return
        diff = differences(manifest["fingerprint"], self._fingerprint)
        if diff:
            if self.overwrite:
                _say([f"replaced the partial run in {p}: it was a different run ({'; '.join(diff[:3])})"])
                self._fresh()
                return
            raise LowbitError(
                f"cannot resume {self.out}: the partial run in {p} was a different run ("
                + "; ".join(diff[:8])
                + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                + "); drop --resume to start again from block 0, or pass --overwrite to replace the partial run"
            )
        self._restore(manifest)

    def _fresh(self) -> None:
        """An empty partial directory with the marker and a manifest, made elsewhere and renamed into
        place, so the partial directory is never without either."""
        try:
            if self.partial.exists() or self.partial.is_symlink():
                shutil.rmtree(self.partial)
            tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=self.out.parent)
            )
            os.chmod(tmp, 0o755)
            write_marker(tmp)
            write_json(tmp / MANIFEST_FILE, self._manifest({}, None))
            os.replace(tmp, self.partial)
            fsync(self.out.parent)
        except OSError as exc:
            raise LowbitError(_os_message(self.out, exc, "")) from exc
        self._blocks, self._boundary = {}, None

    def _read_manifest(self) -> dict[str, Any] | None:
        """The partial run's manifest, or None when it is missing or malformed."""
        try:
            manifest = json.loads((self.partial / MANIFEST_FILE).read_text())
            entries = list(manifest["blocks"].items())
            boundary = manifest["boundary"]
            ok = "fingerprint" in manifest and all(
                int(key) >= 0 and isinstance(e["file"], str) and isinstance(e["bytes"], int) for key, e in entries
            )
            ok = ok and (boundary is None or (isinstance(boundary["index"], int) and isinstance(boundary["file"], str)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return manifest if ok else None

    def _present(self, entry: dict[str, Any]) -> bool:
        path = self.partial / entry["file"]
        return "/" not in entry["file"] and path.is_file() and path.stat().st_size == entry["bytes"]

    def _restore(self, manifest: dict[str, Any]) -> None:
        blocks = {int(k): v for k, v in manifest["blocks"].items() if self._present(v)}
        boundary = manifest.get("boundary")
        if boundary is not None and not self._present(boundary):
            boundary = None
        last = boundary["index"] if boundary is not None else -1
        if not all(i in blocks for i in range(last + 1)):
            last, boundary = -1, None  # the boundary's blocks are gone: nothing to continue from
        kept = {i: e for i, e in blocks.items() if i <= last}
        dropped = sorted(set(int(k) for k in manifest["blocks"]) - set(kept))
        if dropped:
            where = f"after its last saved boundary (block {last})" if last >= 0 else "without a saved boundary"
            _say([f"blocks {dropped} of the partial run in {self.partial} were written {where}; quantized again"])
        self._blocks, self._boundary = kept, boundary
        try:
            if dropped or boundary != manifest.get("boundary"):
                self._write_manifest(kept, boundary)
            self._remove_unlisted()
        except OSError as exc:
            raise LowbitError(_os_message(self.out, exc, "")) from exc
        _say([f"resuming the partial run in {self.partial}: {len(kept)} blocks already written"])

    def _remove_unlisted(self) -> None:
        """Shards, boundaries and temp files the manifest does not list (a kill between a file's
        rename and the manifest's update leaves one)."""
        listed = {e["file"] for e in self._blocks.values()}
        if self._boundary is not None:
            listed.add(self._boundary["file"])
        for path in self.partial.iterdir():
            name = path.name
            ours = _BLOCK_RE.fullmatch(name) or _BOUNDARY_RE.fullmatch(name) or name.endswith(".tmp")
            if ours and name not in listed and path.is_file():
                path.unlink()

    # -- the manifest

    def _manifest(self, blocks: dict[int, dict[str, Any]], boundary: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "manifest_version": 1,
            "format_version": FORMAT_VERSION,
            "fingerprint": self._fingerprint,
            "blocks": {str(i): blocks[i] for i in sorted(blocks)},
            "boundary": boundary,
        }

    def _write_manifest(self, blocks: dict[int, dict[str, Any]], boundary: dict[str, Any] | None) -> None:
        write_json(self.partial / MANIFEST_FILE, self._manifest(blocks, boundary))

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this CheckpointSink is closed (finished or aborted)")

    def _os_error(self, exc: BaseException) -> LowbitError:
        kept = "; the existing output was left as it was" if self.out.exists() else ""
        if self.keep_partial:
            kept += f"; the blocks written so far are kept in {self.partial} (--resume continues)"
        return LowbitError(_os_message(self.out, exc, kept))

    # -- the interface

    def finished(self) -> list[int]:
        """Blocks already written (after a resume: those kept from the partial run)."""
        return sorted(self._blocks)

    def write_block(
        self,
        index: int,
        module_prefix_tensors: dict[str, torch.Tensor],
        layers: dict[str, Any],
        state: dict[str, Any],
        *,
        kv_cache: dict[str, Any] | None = None,
    ) -> None:
        """Write block ``index``: its tensors under their full state-dict names, its entries of the
        ``layers`` table, the runner's JSON-able ``state`` (``block_state`` gives it back after a
        resume) and the block's KV-cache spec (``checkpoint.block_tensors`` returns all but the state)."""
        self._check_open()
        if index < 0:
            raise ValueError(f"block index {index} < 0")
        record = normalized({"layers": layers, "kv_cache": kv_cache, "state": state}, f"block {index}'s record")
        others = {n for i, e in self._blocks.items() if i != index for n in e["tensors"]}
        clash = sorted(set(module_prefix_tensors) & others)
        if clash:
            raise ValueError(f"block {index} has tensors that another block already wrote: {clash[:5]}")
        tensors = unshared(module_prefix_tensors)
        file = block_file(index)
        try:
            if index in self._blocks:  # rewritten: unlist it first, so the manifest never lists a changing file
                blocks = {i: e for i, e in self._blocks.items() if i != index}
                self._write_manifest(blocks, self._boundary)
                self._blocks = blocks
            path = self.partial / file
            save_tensors(tensors, path)
            entry = {
                "file": file,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
                "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "tensors": sorted(tensors),
                **record,
            }
            blocks = {**self._blocks, index: entry}
            self._write_manifest(blocks, self._boundary)
            self._blocks = blocks
        except (OSError, SafetensorError) as exc:
            raise self._os_error(exc) from exc

    def save_boundary(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Keep the hidden states after block ``index`` (the next block's inputs) for a resume;
        only the latest boundary is kept. Call it after ``write_block(index, ...)``."""
        self._check_open()
        file = _BOUNDARY.format(index)
        path = self.partial / file
        old = self._boundary
        try:
            if old is not None and old["file"] == file:  # the same name is rewritten: unlist it first
                self._write_manifest(self._blocks, None)
                self._boundary = None
            save_tensors(unshared({f"hidden.{i}": t for i, t in enumerate(hidden)}), path)
            boundary = {"index": index, "file": file, "count": len(hidden), "bytes": path.stat().st_size}
            self._write_manifest(self._blocks, boundary)
            self._boundary = boundary
            if old is not None and old["file"] != file:
                (self.partial / old["file"]).unlink(missing_ok=True)
        except (OSError, SafetensorError) as exc:
            raise self._os_error(exc) from exc

    def load_boundary(self) -> tuple[int, list[torch.Tensor]] | None:
        """The latest saved boundary: (block index, hidden states after it), or None."""
        self._check_open()
        b = self._boundary
        if b is None:
            return None
        path = self.partial / b["file"]
        try:
            tensors = load_file(str(path))
            hidden = [tensors[f"hidden.{i}"] for i in range(int(b["count"]))]
        except (OSError, SafetensorError, KeyError) as exc:
            raise LowbitError(f"{path} is damaged ({exc}); drop --resume to start again from block 0") from None
        return int(b["index"]), hidden

    def block_state(self, index: int) -> dict[str, Any]:
        """The runner state written with block ``index``."""
        if index not in self._blocks:
            raise KeyError(f"block {index} has not been written")
        return json.loads(json.dumps(self._blocks[index]["state"]))  # a copy

    def finish(
        self,
        model_config: Any,
        tokenizer: Any,
        outer_tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        *,
        outer_layers: dict[str, Any] | None = None,
    ) -> Path:
        """Write the tensors outside the blocks (and ``outer_layers``: layer entries of quantized
        linears outside them, such as a quantized head), config, tokenizer, index and ``lowbit.json``
        (provenance ``meta``, the layers table, KV spec, format version, hashes), then move the
        partial directory into place as the checkpoint. Returns the output path."""
        self._check_open()
        try:
            return self._finish(model_config, tokenizer, outer_tensors, meta, outer_layers or {})
        except (OSError, SafetensorError) as exc:
            raise self._os_error(exc) from exc
        finally:
            if self._open:
                self.abort()  # failed: keep the partial run (or not: keep_partial) and release the lock

    def _finish(
        self,
        model_config: Any,
        tokenizer: Any,
        outer_tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        outer_layers: dict[str, Any],
    ) -> Path:
        order = sorted(self._blocks)
        if order != list(range(len(order))):
            missing = sorted(set(range(order[-1] + 1)) - set(order))
            raise LowbitError(f"cannot finish {self.out}: blocks {missing} were never written")
        weight_map: dict[str, str] = {}
        layers: dict[str, Any] = {}
        kv_specs: list[Any] = []
        total = 0
        for i in order:
            entry = self._blocks[i]
            weight_map.update(dict.fromkeys(entry["tensors"], entry["file"]))
            layers.update(entry["layers"])
            total += entry["tensor_bytes"]
            if entry["kv_cache"] is not None and entry["kv_cache"] not in kv_specs:
                kv_specs.append(entry["kv_cache"])
        if len(kv_specs) > 1:
            raise LowbitError(f"cannot finish {self.out}: blocks have different KV-cache specs {kv_specs}")
        clash = sorted(set(outer_tensors) & set(weight_map))
        if clash:
            raise ValueError(f"outer tensors that a block already wrote: {clash[:5]}")
        both = sorted(set(outer_layers) & set(layers))
        if both:
            raise ValueError(f"outer layers that a block already has: {both[:5]}")
        layers.update(normalized(outer_layers, "outer_layers"))
        outer = unshared(outer_tensors)
        weight_map.update(dict.fromkeys(outer, OUTER_FILE))
        total += sum(t.numel() * t.element_size() for t in outer.values())

        p = self.partial
        self._remove_unlisted()
        model_config.save_pretrained(p)
        if tokenizer is not None:
            tokenizer.save_pretrained(p)
        save_tensors(outer, p / OUTER_FILE)
        index = {
            "metadata": {"format_version": FORMAT_VERSION, "total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_json(p / INDEX_FILE, index)
        # hashes: every file of the checkpoint; shards as recorded when written (they are not read again)
        shards = {e["file"]: e["sha256"] for e in self._blocks.values()}
        # every other file but the run's bookkeeping and files other code put there (dot files: the marker)
        new = {q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file()}
        new -= {META_FILE, MANIFEST_FILE, *shards}
        new = {n for n in new if not n.startswith(".") and not n.endswith(".tmp") and not _BOUNDARY_RE.fullmatch(n)}
        for name in sorted(new):
            fsync(p / name)
        hashes = dict(sorted({**hash_files(p, new), **shards}.items()))
        full = {"format_version": FORMAT_VERSION, **normalized(meta, "meta")}
        # what load_quantized needs comes from the blocks themselves, never from the caller's provenance
        full.update(format_version=FORMAT_VERSION, layers=layers, kv_cache=kv_specs[0] if kv_specs else None)
        full[HASH_KEY] = hashes
        write_json(p / META_FILE, full)
        check_free(self.out, self.overwrite)  # still under the lock; nobody else wrote it meanwhile
        install_dir(p, self.out)  # the commit point: before it the partial run is resumable, after it done
        self._release()
        # the run's bookkeeping is not part of the checkpoint (a kill right here leaves it, unlisted)
        for leftover in (MANIFEST_FILE, *(b["file"] for b in [self._boundary] if b is not None)):
            (self.out / leftover).unlink(missing_ok=True)
        return self.out

    def abort(self) -> None:
        """After an exception: release the lock and keep the partial directory for ``--resume``
        (removed instead when ``keep_partial`` is False). Does nothing once closed."""
        if not self._open:
            return
        try:
            if not self.keep_partial:
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        self._open = False
        self._stack.close()

    def __enter__(self) -> CheckpointSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()  # after finish: nothing; otherwise the run stopped early

    def __del__(self) -> None:  # dropped without finish or abort: the lock goes, the partial run stays
        try:
            if getattr(self, "_open", False):
                self._release()
        except Exception:
            pass
