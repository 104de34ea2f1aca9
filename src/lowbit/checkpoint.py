"""Save and load lowbit's own quantized checkpoints.

A checkpoint directory (format 2, written through ``lowbit.sink.CheckpointSink``; its docstring
has the file layout) holds ``config.json`` (the model's transformers config), the tokenizer files,
one ``lowbit-blocks-NNNNN.safetensors`` per decoder block, ``lowbit-outer.safetensors`` (every
tensor outside the blocks), the index ``lowbit.safetensors.index.json`` (tensor -> file) and
``lowbit.json`` (format version, the scheme and recipe as provenance, and per quantized layer its
shape and specs). Format 1 held the same tensors in one ``lowbit.safetensors``; both load. For a
quantized linear ``NAME``:

- ``NAME.weight_packed`` uint8: the codes as unsigned integers (signed codes offset by
  ``-qmin``; float codes are bit patterns), bit-packed LSB first (``lowbit.packing``);
- ``NAME.weight_scale`` (out, G) in the scale dtype; ``NAME.weight_zero_point`` (out, G) int32
  for asymmetric specs; ``NAME.weight_g_idx`` (in,) int64 only when columns were regrouped;
- ``NAME.input_scale`` / ``NAME.input_zero_point`` for static activation quantization;
- ``ATTN.k_scale`` / ``k_zero_point`` / ``v_scale`` / ``v_zero_point`` for a static KV cache;
- BCQ weights (LUT-GEMM; the layer entry says ``"representation": "bcq"``): ``NAME.weight_bcq_packed``,
  ``NAME.weight_bcq_alpha``, ``NAME.weight_bcq_offset`` (``lowbit.bcq.bcq_tensors``).

Every other tensor keeps its state-dict name. ``block_tensors`` gives one decoder block's tensors
and layer entries (what the block runner hands the sink); ``save_quantized`` writes an in-memory
model block by block through the same sink. Writes go to a partial directory that is renamed into
place only when complete, so an existing output is never half-overwritten.

``lowbit.json`` also records the SHA-256 of every other file written (``"sha256"``), and loading
checks them and every number (``lowbit.verify``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lowbit.archs import decoder_blocks, get_arch
from lowbit.bcq import BCQWeight, bcq_tensors, load_bcq
from lowbit.errors import LowbitError
from lowbit.kvcache import KVQuantizer, attach_kv_quantizers
from lowbit.models import no_remote_code
from lowbit.modules import ActQuantizer, QuantLinear
from lowbit.outdir import check_free
from lowbit.packing import pack_bits, packed_nbytes, unpack_bits
from lowbit.primitives import group_index, symmetric_zero_point
from lowbit.qweight import QuantizedWeight
from lowbit.reorder import ReorderedNorm, check_perm
from lowbit.scheme import QuantSpec, spec_from_dict, to_dict
from lowbit.sink import FORMAT_VERSION, INDEX_FILE, META_FILE, OUTER_FILE, V1_WEIGHTS_FILE, CheckpointSink, block_file
from lowbit.verify import check_config_file, check_listed, check_model, hashes_checked, verify_hashes

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILE",
    "META_FILE",
    "OUTER_FILE",
    "V1_WEIGHTS_FILE",
    "block_file",
    "block_prefixes",
    "block_tensors",
    "is_quantized_dir",
    "load_quantized",
    "outer_tensors",
    "plain_tensors",
    "save_quantized",
    "weight_files",
]
READ_VERSIONS = (1, FORMAT_VERSION)
# file names are lowbit's own (not model.safetensors): transformers must not half-load a checkpoint


def _qweight_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    fmt = qw.spec.fmt
    codes = qw.codes.to(torch.int16) - int(fmt.qmin) if not fmt.is_float else qw.codes
    out = {
        f"{name}.weight_packed": pack_bits(codes.to(torch.int16), fmt.bits),
        f"{name}.weight_scale": qw.scale.contiguous(),
    }
    if not qw.spec.symmetric:
        out[f"{name}.weight_zero_point"] = qw.zero_point.to(torch.int32).contiguous()
    default = group_index(qw.shape[1], qw.spec.group_size if qw.spec.granularity == "group" else None)
    if not torch.equal(qw.g_idx.cpu(), default):
        out[f"{name}.weight_g_idx"] = qw.g_idx.contiguous()
    if qw.outlier_idx is not None and qw.outlier_weight is not None:  # OWQ's float columns
        out[f"{name}.weight_outlier_idx"] = qw.outlier_idx.to(torch.int64).contiguous()
        out[f"{name}.weight_outlier"] = qw.outlier_weight.contiguous()
    if qw.lorc_u is not None and qw.lorc_v is not None:  # LoRC's low-rank error factors
        out[f"{name}.weight_lorc_u"] = qw.lorc_u.contiguous()
        out[f"{name}.weight_lorc_v"] = qw.lorc_v.contiguous()
    return out


def _load_qweight(name: str, shape: list[int], spec: QuantSpec, t: dict[str, torch.Tensor]) -> QuantizedWeight:
    fmt = spec.fmt
    out, inp = shape
    packed = t.pop(f"{name}.weight_packed")
    if packed.numel() != packed_nbytes(out * inp, fmt.bits):
        raise LowbitError(
            f"{name}.weight_packed holds {packed.numel()} bytes, but {out}x{inp} codes of {fmt.bits} bits "
            f"take {packed_nbytes(out * inp, fmt.bits)}; the checkpoint does not match its {META_FILE}"
        )
    codes = unpack_bits(packed, fmt.bits, out * inp).reshape(out, inp)
    codes = (codes.to(torch.int16) + int(fmt.qmin)).to(fmt.code_dtype) if not fmt.is_float else codes
    scale = t.pop(f"{name}.weight_scale")
    # only asymmetric specs store zero points; one left over in the file is reported as unexpected
    zp_t = None if spec.symmetric else t.pop(f"{name}.weight_zero_point")
    zp = zp_t.to(torch.float32) if zp_t is not None else torch.full(scale.shape, float(symmetric_zero_point(fmt)))
    g_idx = t.pop(f"{name}.weight_g_idx", None)
    if g_idx is None:
        g_idx = group_index(inp, spec.group_size if spec.granularity == "group" else None)
    n_groups = 1 if spec.granularity != "group" else -(-inp // (spec.group_size or 1))
    want = (1, 1) if spec.granularity == "tensor" else (out, n_groups)
    if tuple(scale.shape) != want or tuple(zp.shape) != want or tuple(g_idx.shape) != (inp,):
        raise LowbitError(
            f"{name}: scales {tuple(scale.shape)} / zero points {tuple(zp.shape)} / g_idx {tuple(g_idx.shape)} "
            f"do not fit a {out}x{inp} weight with {spec.describe()} (scales {want}); the checkpoint does not "
            f"match its {META_FILE}"
        )
    if inp and (int(g_idx.min()) < 0 or int(g_idx.max()) >= want[1]):
        raise LowbitError(f"{name}.weight_g_idx has groups outside 0..{want[1] - 1}")
    idx, kept = t.pop(f"{name}.weight_outlier_idx", None), t.pop(f"{name}.weight_outlier", None)
    if (idx is None) != (kept is None) or (
        idx is not None
        and kept is not None
        and (idx.dim() != 1 or tuple(kept.shape) != (out, idx.numel()) or (idx.numel() and int(idx.max()) >= inp))
    ):
        raise LowbitError(f"{name}: float columns (weight_outlier_idx / weight_outlier) are incomplete or misshaped")
    lorc_u, lorc_v = t.pop(f"{name}.weight_lorc_u", None), t.pop(f"{name}.weight_lorc_v", None)
    if (lorc_u is None) != (lorc_v is None) or (
        lorc_u is not None
        and lorc_v is not None
        and (lorc_u.dim() != 2 or lorc_u.shape[0] != out or tuple(lorc_v.shape) != (lorc_u.shape[1], inp))
    ):
        raise LowbitError(f"{name}: LoRC factors (weight_lorc_u / weight_lorc_v) are incomplete or misshaped")
    return QuantizedWeight(
        codes=codes,
        scale=scale,
        zero_point=zp,
        g_idx=g_idx,
        spec=spec,
        outlier_idx=idx,
        outlier_weight=kept,
        lorc_u=lorc_u,
        lorc_v=lorc_v,
    )


def plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the QuantLinear layers and the KV quantizers, tied tensors
    (lm_head = embed_tokens) once: what every file format stores as it is."""
    skip = {
        f"{name}.{k}"
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for k, _ in m.named_buffers(recurse=True)
    }
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key in skip or "lowbit_kv" in key or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[key] = value
    return out


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_tensors(
    root: nn.Module, prefix: str, skip: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Tensors, layer entries and KV spec of ``root`` (named ``prefix`` in the model), leaving out
    the submodules named in ``skip`` (names relative to ``root``)."""

    def full(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else prefix or name

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    kv_spec: dict[str, Any] | None = None
    for rel, module in root.named_modules():
        if _under(rel, skip):
            continue
        name = full(rel)
        if isinstance(module, QuantLinear):
            entry: dict[str, Any] = {
                "shape": [module.out_features, module.in_features],
                "dtype": str(module.weight.dtype).removeprefix("torch."),
                "weights": None,
            }
            if module.bcq is not None:  # BCQ binary codes (LUT-GEMM): their own tensors
                tensors.update(bcq_tensors(name, module.bcq))
                entry["weights"], entry["representation"] = to_dict(module.bcq.spec), "bcq"
            elif module.qweight is not None:
                tensors.update(_qweight_tensors(name, module.qweight))
                entry["weights"] = to_dict(module.qweight.spec)
                if module.qweight.n_outlier_columns:
                    entry["float_columns"] = module.qweight.n_outlier_columns
                if module.qweight.lorc_u is not None:
                    entry["lorc_rank"] = int(module.qweight.lorc_u.shape[1])
            else:
                tensors[f"{name}.weight"] = module.weight
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias
            entry["input_activations"] = to_dict(module.act.spec) if module.act is not None else None
            if module.act is not None and module.act.scale is not None and module.act.zero_point is not None:
                tensors[f"{name}.input_scale"] = module.act.scale
                tensors[f"{name}.input_zero_point"] = module.act.zero_point
            if module.act is not None and module.act.cluster_idx is not None:  # RPTQ's channel clusters
                tensors[f"{name}.input_cluster_idx"] = module.act.cluster_idx
            layers[name] = entry
        kvq = getattr(module, "lowbit_kv", None)
        if isinstance(kvq, KVQuantizer):
            kv_spec = to_dict(kvq.spec)
            for kind, (scale, zp) in kvq.qparams.items():
                tensors[f"{name}.{kind}_scale"], tensors[f"{name}.{kind}_zero_point"] = scale, zp
    tensors.update({full(k): v for k, v in plain_tensors(root).items() if not _under(k, skip)})
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, layers, kv_spec


def block_tensors(
    block_module: nn.Module, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """One decoder block as the checkpoint stores it: (tensors under their full state-dict names,
    the block's entries of the ``layers`` table, its KV-cache spec or None); ``prefix`` is the
    block's name in the model (``model.layers.3``). What the block runner gives the sink."""
    return _module_tensors(block_module, prefix, [])


def block_prefixes(model: nn.Module) -> list[str]:
    """Names of the decoder blocks (``model.layers.0``, ...); none for a model lowbit's
    architecture table does not know (it is then written as one outer part)."""
    try:
        arch = get_arch(model)
        blocks = decoder_blocks(model, arch)
    except LowbitError:
        return []
    return [f"{arch.blocks}.{i}" for i in range(len(blocks))]


def outer_tensors(
    model: nn.Module, prefixes: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything outside the decoder blocks (``prefixes``, default ``block_prefixes(model)``):
    (tensors, layer entries of quantized linears there, e.g. a quantized head); for
    ``CheckpointSink.finish``."""
    tensors, layers, kv = _module_tensors(model, "", block_prefixes(model) if prefixes is None else prefixes)
    if kv is not None:
        raise LowbitError("a KV-cache quantizer outside the decoder blocks cannot be saved")
    return tensors, layers


def save_quantized(
    model: nn.Module, tokenizer: Any, out_dir: str | Path, provenance: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write ``model`` (with QuantLinear modules) and its tokenizer to ``out_dir`` atomically,
    block by block through ``CheckpointSink`` (nothing to resume: a failure leaves no partial run)."""
    out = Path(out_dir)
    check_free(out, overwrite)
    prefixes = block_prefixes(model)
    with CheckpointSink(out, overwrite=overwrite, resume=False, fingerprint={"writer": "save_quantized"}) as sink:
        sink.keep_partial = False
        for i, prefix in enumerate(prefixes):
            tensors, layers, kv = block_tensors(model.get_submodule(prefix), prefix)
            sink.write_block(i, tensors, layers, {}, kv_cache=kv)
        outer, outer_layers = outer_tensors(model, prefixes)
        return sink.finish(model.config, tokenizer, outer, provenance, outer_layers=outer_layers)


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_quantized(
    path: str | Path, *, trust_remote_code: bool = False, verify: bool = True
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a checkpoint written by ``save_quantized``: (model, tokenizer, lowbit metadata).

    ``verify=False`` skips comparing the files with the hashes in ``lowbit.json`` (for a
    checkpoint edited on purpose); the values are checked either way. A config that needs the
    model repository's own code is refused unless ``trust_remote_code``.
    """
    p = Path(path)
    if not is_quantized_dir(p):
        raise LowbitError(f"{p} is not a lowbit checkpoint (no {META_FILE}); quantize a model first")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"{p / META_FILE} is not valid JSON ({e}); the checkpoint is damaged, quantize again") from e
    if not isinstance(meta, dict):
        raise LowbitError(f"{p}/{META_FILE} is not a JSON object; the checkpoint is damaged, quantize again")
    if meta.get("format_version") not in READ_VERSIONS:
        raise LowbitError(
            f"{p} has lowbit format {meta.get('format_version')}, this lowbit reads {FORMAT_VERSION} (and 1)"
        )
    check = verify and hashes_checked()
    if check:
        verify_hashes(p, meta)
    files = weight_files(p, meta["format_version"])
    if check:
        check_listed(p, [f.name for f in files], meta)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (OSError, SafetensorError) as e:
            raise LowbitError(f"{file} is damaged or incomplete ({e}); quantize again") from None
    if not isinstance(meta.get("layers"), dict):
        raise LowbitError(f"{p}/{META_FILE} has no 'layers' table; the checkpoint is damaged, quantize again")
    check_config_file(p / "config.json")
    with no_remote_code(p, trust_remote_code), init_empty_weights():
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    try:
        for name, entry in meta["layers"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise LowbitError(f"{p}: {META_FILE} names layer {name}, which this model does not have") from None
            if not isinstance(module, nn.Linear):
                raise LowbitError(f"{p}: {name} is not a linear layer of this model; the checkpoint does not match")
            if list(entry["shape"]) != [module.out_features, module.in_features]:
                raise LowbitError(
                    f"{p}: {name} has shape {entry['shape']} in {META_FILE} but "
                    f"{[module.out_features, module.in_features]} in the model's config; the checkpoint does not match"
                )
            wspec = spec_from_dict(entry["weights"], f"{name}.weights")
            aspec = spec_from_dict(entry["input_activations"], f"{name}.input_activations")
            qw: QuantizedWeight | BCQWeight | None = None
            if wspec is not None and entry.get("representation") == "bcq":
                qw = load_bcq(name, entry["shape"], wspec, tensors)
            elif wspec is not None:
                qw = _load_qweight(name, entry["shape"], wspec, tensors)
            act = ActQuantizer(aspec) if aspec else None
            if act is not None and f"{name}.input_scale" in tensors:
                act.set_qparams(tensors.pop(f"{name}.input_scale"), tensors.pop(f"{name}.input_zero_point"))
            if act is not None and aspec is not None and aspec.granularity == "cluster":
                act.cluster_idx = _cluster_idx(name, entry["shape"][1], aspec, act, tensors)
            fw = tensors.pop(f"{name}.weight", None)
            bias = tensors.pop(f"{name}.bias", None)
            dtype = fw.dtype if fw is not None else _dtype(entry.get("dtype", "float32"), f"{p}: {name}")
            model.set_submodule(name, QuantLinear(qw, bias, act, float_weight=fw, dtype=dtype))
        # older files kept the KV spec only in the provenance's scheme
        kv = meta["kv_cache"] if "kv_cache" in meta else (meta.get("scheme") or {}).get("kv_cache")
        if kv:
            _load_kv(model, spec_from_dict(kv, "kv_cache"), tensors)
    except AttributeError as e:
        raise LowbitError(f"{p} names a layer its config does not have ({e})") from None
    except KeyError as e:
        raise LowbitError(f"{p} is missing tensor {e}; the checkpoint is incomplete, quantize again") from None
    _add_missing_biases(model, tensors)
    _add_reordered_norms(model, tensors)
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta or unexpected:
        raise LowbitError(f"{p} does not match its config: missing {still_meta[:5]}, unexpected {unexpected[:5]}")
    try:
        check_model(model)
    except LowbitError as e:
        raise LowbitError(f"{p}: {e}; the checkpoint is damaged, quantize again") from None
    model.eval()
    tokenizer = None
    if (p / "tokenizer_config.json").exists():
        with no_remote_code(p, trust_remote_code):
            tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    return model, tokenizer, meta


def weight_files(path: str | Path, version: int | None = None) -> list[Path]:
    """The safetensors files of a checkpoint: its shards (format 2, from the index) or
    ``lowbit.safetensors`` (format 1). ``version`` defaults to what ``lowbit.json`` says."""
    p = Path(path)
    if version is None:
        try:
            version = json.loads((p / META_FILE).read_text()).get("format_version")
        except (OSError, ValueError, AttributeError) as e:
            raise LowbitError(f"{p / META_FILE} is missing or not valid JSON ({e}); quantize again") from None
    if version == 1:
        return [p / V1_WEIGHTS_FILE]
    index = p / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except FileNotFoundError:
        raise LowbitError(f"{index} is missing: the checkpoint is damaged or incomplete; quantize again") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LowbitError(f"{index} is damaged or incomplete ({e!r}); quantize again") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise LowbitError(f"{index} names a file that is not a shard of the checkpoint ({name!r}); quantize again")
    return [p / name for name in names]


def _add_missing_biases(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a bias-less ``nn.Linear`` a (meta) bias where the file has ``NAME.bias``, for
    ``load_state_dict`` to assign: transforms such as OS+'s shift add biases that the model's
    config does not declare (quantized layers get theirs from the layer table)."""
    for key in tensors:
        if not key.endswith(".bias"):
            continue
        try:
            module = model.get_submodule(key.removesuffix(".bias"))
        except AttributeError:
            continue  # load_state_dict reports it as unexpected
        if isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.empty(module.out_features, device="meta"))


def _cluster_idx(name: str, width: int, spec: QuantSpec, act: ActQuantizer, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The channel clusters of a per-cluster activation quantizer (RPTQ), checked against its spec."""
    idx = t.pop(f"{name}.input_cluster_idx")
    k = spec.clusters or 0
    scale = act.scale
    if (
        idx.dtype != torch.int64
        or tuple(idx.shape) != (width,)
        or (width and (int(idx.min()) < 0 or int(idx.max()) >= k))
        or scale is None
        or tuple(scale.shape) != (k,)
    ):
        raise LowbitError(
            f"{name}: input_cluster_idx / input_scale do not fit {width} channels in {k} clusters; the checkpoint "
            f"does not match its {META_FILE}"
        )
    return idx


def _add_reordered_norms(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Wrap each norm saved with ``NAME.output_perm`` (RPTQ's reordered norm output) in a
    ``ReorderedNorm``, so ``load_state_dict`` puts its weight under ``NAME.norm``."""
    for key in [k for k in tensors if k.endswith(".output_perm")]:
        name = key.removesuffix(".output_perm")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # load_state_dict reports it as unexpected
        if not isinstance(module, ReorderedNorm):
            width = getattr(module, "weight", None)
            n = int(width.numel()) if isinstance(width, torch.Tensor) else -1
            model.set_submodule(name, ReorderedNorm(module, check_perm(tensors[key], n, key)))


def _dtype(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise LowbitError(f"{where}: unknown dtype {name!r}")
    return dtype


def _load_kv(model: nn.Module, spec: QuantSpec | None, tensors: dict[str, torch.Tensor]) -> None:
    if spec is None:
        return
    arch = get_arch(model)
    blocks = decoder_blocks(model, arch)
    prefixes = [f"{arch.blocks}.{i}.{arch.attention}" for i in range(len(blocks))]
    quants = attach_kv_quantizers(model, [b.get_submodule(arch.attention) for b in blocks], spec)
    for prefix, q in zip(prefixes, quants, strict=True):
        q.observing = False
        if not spec.dynamic:
            for kind in ("k", "v"):
                q.qparams[kind] = (
                    tensors.pop(f"{prefix}.{kind}_scale"),
                    tensors.pop(f"{prefix}.{kind}_zero_point"),
                )
