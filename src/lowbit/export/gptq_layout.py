"""Hugging Face GPTQ and AWQ (GEMM) model directories.

Both write ``config.json`` (the model's config plus ``quantization_config``), the tokenizer and
``model.safetensors``. Every tensor that is not a quantized linear keeps its state-dict name and
dtype (float layers such as ``lm_head`` are ordinary ``weight``/``bias``). For a quantized
linear ``NAME`` with weight (out, in), ``G`` groups and ``bits`` bits:

**GPTQ** (``quant_method: gptq``; bits 2, 3, 4, 8; one bits/group size for the whole model):

- ``NAME.qweight`` int32 (in*bits/32, out): the codes packed along the input dimension, LSB
  first as one bit stream per output column (3-bit codes cross word boundaries: 32 codes fill 3
  words); columns stay in their original order;
- ``NAME.qzeros`` int32 (G, out*bits/32): zero points packed the same way along the output
  dimension. ``checkpoint_format: gptq`` (AutoGPTQ v1, the default, read by every GPTQ loader)
  stores ``zero - 1`` and loaders add 1 back, so a zero point of 0 cannot be stored and is refused;
  ``gptq_v2`` (GPTQModel, vLLM) stores the zero point itself;
- ``NAME.scales`` float16 (G, out); ``NAME.g_idx`` int32 (in,): the group of each input column;
- the weight is ``scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.

``group_size`` is -1 for per-channel (and per-tensor, whose one scale is repeated per channel)
weights. ``desc_act`` is true when some layer's ``g_idx`` is not ``i // group_size`` (act-order);
``sym`` is true when every layer is symmetric (zero point ``2**(bits-1)``). ``damp_percent``,
``true_sequential`` and ``static_groups`` are provenance fields the loaders' validators expect,
not a record of how lowbit quantized. When linears inside the decoder blocks are kept in float,
``modules_in_block_to_quantize`` lists the quantized ones (transformers/optimum and vLLM honour
it); it names one set for every block.

**AWQ GEMM** (``quant_method: awq``, ``version: gemm``, ``bits: 4``, ``zero_point: true``, groups
only, no ``g_idx``): ``NAME.qweight`` int32 (in, out/8) and ``NAME.qzeros`` int32 (G, out/8)
pack eight 4-bit values per word along the output dimension in AWQ's order
``[0, 2, 4, 6, 1, 3, 5, 7]``; zero points are stored as they are; ``NAME.scales`` float16 (G, out).
Float linears are listed in ``modules_to_not_convert``.

lowbit's grids map exactly: ``uintB`` codes and zero points are stored as they are; signed
``intB`` codes ``q`` are stored as ``q + 2**(B-1)`` with zero point ``zero + 2**(B-1)`` (so a
symmetric ``int4`` layer has zero point 8, in AWQ too). Scales in float16 are stored exactly;
other scale dtypes are converted to float16 and the largest relative change of a weight is
reported in a note. Refused, naming layer and property: float formats, activation or KV-cache
quantization, OWQ float columns, other bit widths, group sizes that do not divide
``in_features``, shapes the packing cannot split, scales outside float16's range, quantized
layers outside the decoder blocks, and settings that differ between layers.
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit import __version__
from lowbit.archs import decoder_blocks, get_arch
from lowbit.checkpoint import plain_tensors
from lowbit.errors import LowbitError
from lowbit.export.base import Exporter, Problem, dividing_groups, kv_spec, quantized_linears, refusal, short_list
from lowbit.export.gptq_packing import (
    awq_pack_output_dim,
    fp16_scales,
    gptq_pack_input_dim,
    gptq_pack_output_dim,
    has_act_order,
    layout_group_size,
    stored_grid,
)
from lowbit.formats import IntFormat
from lowbit.modules import QuantLinear
from lowbit.qweight import QuantizedWeight

WEIGHTS_FILE = "model.safetensors"


@dataclass
class _Plan:
    """What check found: the quantized layers and the model-wide settings of the file."""

    problems: list[Problem] = field(default_factory=list)
    layers: list[tuple[str, QuantizedWeight]] = field(default_factory=list)
    float_linears: list[str] = field(default_factory=list)
    blocks: str = ""
    bits: int = 0
    group_size: int = 0  # -1: per channel
    sym: bool = True
    desc_act: bool = False
    in_block_quantized: list[str] | None = None  # modules_in_block_to_quantize, when some are float


class _PackedIntExporter(Exporter):
    """What the GPTQ and AWQ exporters share: the checks, the tensors around the layers, the files."""

    bits_allowed: tuple[int, ...] = ()
    allow_channel = True
    allow_g_idx = True
    names_quantized_in_blocks = True  # modules_in_block_to_quantize: one set of linears for every block

    @abstractmethod
    def _layer_problems(self, name: str, qw: QuantizedWeight, options: Mapping[str, str]) -> list[Problem]:
        """What this layout cannot hold of one layer's grid."""

    @abstractmethod
    def _layer_tensors(
        self, name: str, qw: QuantizedWeight, scales: torch.Tensor, options: Mapping[str, str]
    ) -> dict[str, torch.Tensor]:
        """The layout's tensors for one layer."""

    @abstractmethod
    def _quant_config(self, plan: _Plan, options: Mapping[str, str]) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""

    def check(self, model: nn.Module, options: Mapping[str, str]) -> list[Problem]:
        return self._plan(model, options).problems

    def _plan(self, model: nn.Module, options: Mapping[str, str]) -> _Plan:
        plan = _Plan()
        spec = kv_spec(model)
        if spec is not None:
            detail = f"{spec.describe()}; {self.name} files hold quantized weights only"
            plan.problems.append(Problem("kv_cache", "KV cache", detail))
        try:
            arch = get_arch(model)
            n_blocks = len(decoder_blocks(model, arch))
            plan.blocks = arch.blocks
        except LowbitError as exc:
            plan.problems.append(Problem("model", "architecture", str(exc)))
            n_blocks = 0
        quantized = dict(quantized_linears(model))
        plan.float_linears = [
            n
            for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) and n not in quantized)
            or (isinstance(m, QuantLinear) and m.qweight is None and m.act is None)
        ]
        for name, module in quantized.items():
            if module.act is not None:
                detail = f"{module.act.spec.describe()}; {self.name} is weight-only: keep activations in float"
                plan.problems.append(Problem(name, "input activations", detail))
            if module.qweight is not None:
                problems = self._common_problems(name, module.qweight, plan.blocks)
                problems = problems or self._layer_problems(name, module.qweight, options)
                plan.problems += problems
                plan.layers.append((name, module.qweight))
        if not plan.layers:
            plan.problems.append(Problem("model", "weights", "no quantized linear layer; quantize the weights first"))
            return plan
        self._model_settings(plan, n_blocks)
        return plan

    def _common_problems(self, name: str, qw: QuantizedWeight, blocks: str) -> list[Problem]:
        spec, inp = qw.spec, qw.shape[1]
        if not isinstance(spec.fmt, IntFormat):
            return [Problem(name, "weights format", f"{spec.format} is a float format; {self.name} stores integers")]
        problems = []
        if spec.bits not in self.bits_allowed:
            allowed = " or ".join(map(str, self.bits_allowed))
            problems.append(Problem(name, "bits", f"{spec.bits} bits; {self.name} holds integers of {allowed} bits"))
        if spec.granularity != "group" and not self.allow_channel:
            problems.append(Problem(name, "granularity", f"{spec.granularity}; {self.name} holds groups only"))
        if spec.granularity == "group" and inp % (spec.group_size or 1):
            detail = f"{spec.group_size} does not divide in_features {inp}; {dividing_groups(inp)}"
            problems.append(Problem(name, "group size", detail))
        if qw.n_outlier_columns:
            detail = f"{qw.n_outlier_columns} input columns kept in float16 (OWQ); {self.name} has no place for them"
            problems.append(Problem(name, "float columns", detail))
        if blocks and not name.startswith(blocks + "."):
            detail = f"quantized outside the decoder blocks ({blocks}), where {self.name} loaders keep float: ignore it"
            problems.append(Problem(name, "placement", detail))
        if has_act_order(qw) and not self.allow_g_idx:
            detail = f"act-order groups (g_idx); {self.name} has no g_idx: quantize with static groups or export gptq"
            problems.append(Problem(name, "group order", detail))
        s16 = qw.scale.cpu().to(torch.float16)
        n_bad = int((~torch.isfinite(s16) | (s16 == 0)).sum())
        if n_bad:
            detail = f"{n_bad} scale(s) outside float16's range, which {self.name} stores scales in"
            problems.append(Problem(name, "scale", detail))
        if not problems and has_act_order(qw) and spec.granularity == "group":
            counts = torch.bincount(qw.g_idx.cpu(), minlength=inp // (spec.group_size or 1))
            if not bool(counts.eq(int(spec.group_size or 0)).all()):
                detail = f"g_idx groups of unequal size (sizes {counts.min()}..{counts.max()}, want {spec.group_size})"
                problems.append(Problem(name, "group order", detail))
        return problems

    def _model_settings(self, plan: _Plan, n_blocks: int) -> None:
        """One bits and group size for the whole file; float linears inside blocks named for loaders."""
        first, qw0 = plan.layers[0]
        plan.bits, plan.group_size = qw0.spec.bits, layout_group_size(qw0)
        for name, qw in plan.layers[1:]:
            pairs = (("bits", qw.spec.bits, plan.bits), ("group size", layout_group_size(qw), plan.group_size))
            for prop, mine, ref in pairs:
                if mine != ref:
                    detail = f"{mine}, but {first} has {ref}; the {self.name} config holds one value for the model"
                    plan.problems.append(Problem(name, prop, detail))
        plan.sym = all(qw.spec.symmetric for _, qw in plan.layers)
        plan.desc_act = any(has_act_order(qw) for _, qw in plan.layers)
        prefix = plan.blocks + "."
        if not self.names_quantized_in_blocks or not any(n.startswith(prefix) for n in plan.float_linears):
            return
        per_block: list[set[str]] = [set() for _ in range(n_blocks)]
        for name, _ in plan.layers:
            index, _, rest = name.removeprefix(prefix).partition(".")
            if name.startswith(prefix) and index.isdigit() and int(index) < n_blocks:
                per_block[int(index)].add(rest)
        if len({frozenset(s) for s in per_block}) > 1:
            shown = "; ".join(f"block {i}: {', '.join(sorted(s)) or 'none'}" for i, s in enumerate(per_block[:3]))
            detail = f"the decoder blocks quantize different linears ({shown}, ...); the file names one set for all"
            plan.problems.append(Problem("model", "layers kept in float", detail))
        plan.in_block_quantized = sorted(per_block[0]) if per_block else []

    def write(self, model: nn.Module, tokenizer: Any, out: Path, options: Mapping[str, str]) -> list[str]:
        plan = self._plan(model, options)
        if plan.problems:
            raise refusal(self.name, plan.problems)
        tensors = plain_tensors(model)
        converted: list[tuple[str, float]] = []
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                if module.qweight is None:
                    tensors[f"{name}.weight"] = module.weight
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias
        for name, qw in plan.layers:
            scales, rel = fp16_scales(qw)
            if qw.scale.dtype != torch.float16:
                converted.append((name, rel))
            tensors.update(self._layer_tensors(name, qw, scales.t().contiguous(), options))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        config = json.loads(model.config.to_json_string())  # type: ignore[union-attr, operator]
        config["quantization_config"] = self._quant_config(plan, options)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        return self._notes(plan, converted)

    def _notes(self, plan: _Plan, converted: list[tuple[str, float]]) -> list[str]:
        notes = []
        inexact = [(n, r) for n, r in converted if r > 0]
        if inexact:
            worst = max(r for _, r in inexact)
            notes.append(
                f"scales stored as float16 (the layout's type); {len(inexact)} layer(s) had scales float16 cannot "
                f"hold exactly ({short_list([n for n, _ in inexact])}): largest relative change of a weight "
                f"{worst:.2e}; quantize with scale_dtype float16 for an exact file"
            )
        if plan.float_linears:
            notes.append(f"{len(plan.float_linears)} linear layer(s) kept in float: {short_list(plan.float_linears)}")
        if plan.desc_act:
            notes.append("act-order groups (g_idx) stored: desc_act is true, which some GPTQ kernels run slower")
        return notes


class GPTQExporter(_PackedIntExporter):
    name = "gptq"
    description = "Hugging Face GPTQ directory (qweight/qzeros/scales/g_idx): transformers, vLLM, GPTQModel"
    options_help = MappingProxyType(
        {
            "checkpoint_format": "gptq (default: AutoGPTQ v1, zero points stored minus 1, read by every GPTQ "
            "loader) or gptq_v2 (GPTQModel/vLLM: zero points stored as they are; allows a zero point of 0)"
        }
    )
    bits_allowed = (2, 3, 4, 8)

    def _format(self, options: Mapping[str, str]) -> str:
        fmt = options.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise LowbitError(f"checkpoint_format {fmt!r} is not gptq or gptq_v2; e.g. --opt checkpoint_format=gptq")
        return fmt

    def _layer_problems(self, name: str, qw: QuantizedWeight, options: Mapping[str, str]) -> list[Problem]:
        problems = []
        (out, inp), bits = qw.shape, qw.spec.bits
        for dim, size, packed in (("in_features", inp, "qweight"), ("out_features", out, "qzeros")):
            if (size * bits) % 32:
                per = 32 // math.gcd(32, bits)
                detail = f"{dim} {size} is not a multiple of {per}, so {bits}-bit {packed} cannot fill int32 words"
                problems.append(Problem(name, "shape", detail))
        if self._format(options) == "gptq":
            n_zero = int((torch.round(qw.zero_point.float()) == qw.spec.fmt.qmin).sum())
            if n_zero:
                detail = (
                    f"{n_zero} group(s) with zero point {qw.spec.fmt.qmin}, which checkpoint_format gptq stores as "
                    "zero-1 = -1 and loaders cannot read; use --opt checkpoint_format=gptq_v2 or a symmetric scheme"
                )
                problems.append(Problem(name, "zero point", detail))
        return problems

    def _layer_tensors(
        self, name: str, qw: QuantizedWeight, scales: torch.Tensor, options: Mapping[str, str]
    ) -> dict[str, torch.Tensor]:
        codes, zeros = stored_grid(qw)
        if self._format(options) == "gptq":
            zeros = zeros - 1  # v1: loaders add 1 back
        bits = qw.spec.bits
        return {
            f"{name}.qweight": gptq_pack_input_dim(codes, bits),
            f"{name}.qzeros": gptq_pack_output_dim(zeros, bits),
            f"{name}.scales": scales,
            f"{name}.g_idx": qw.g_idx.cpu().to(torch.int32),
        }

    def _quant_config(self, plan: _Plan, options: Mapping[str, str]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": plan.bits,
            "group_size": plan.group_size,
            "desc_act": plan.desc_act,
            "sym": plan.sym,
            "checkpoint_format": self._format(options),
            "pack_dtype": "int32",
            "lm_head": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "static_groups": False,
            "meta": {"quantizer": [f"lowbit:{__version__}"]},
        }
        if plan.in_block_quantized is not None:
            config["modules_in_block_to_quantize"] = [plan.in_block_quantized]
        return config


class AWQExporter(_PackedIntExporter):
    name = "awq"
    description = "AutoAWQ GEMM directory (4-bit groups, interleaved packing): transformers, vLLM"
    bits_allowed = (4,)
    allow_channel = False
    allow_g_idx = False
    names_quantized_in_blocks = False  # modules_to_not_convert names each float linear

    def _layer_problems(self, name: str, qw: QuantizedWeight, options: Mapping[str, str]) -> list[Problem]:
        out = qw.shape[0]
        if out % 8:
            return [Problem(name, "shape", f"out_features {out} is not a multiple of 8 (eight 4-bit values a word)")]
        return []

    def _layer_tensors(
        self, name: str, qw: QuantizedWeight, scales: torch.Tensor, options: Mapping[str, str]
    ) -> dict[str, torch.Tensor]:
        codes, zeros = stored_grid(qw)
        return {
            f"{name}.qweight": awq_pack_output_dim(codes.t()),
            f"{name}.qzeros": awq_pack_output_dim(zeros.t()),
            f"{name}.scales": scales,
        }

    def _quant_config(self, plan: _Plan, options: Mapping[str, str]) -> dict[str, Any]:
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "group_size": plan.group_size,
            "zero_point": True,
            "modules_to_not_convert": plan.float_linears or None,
        }


GPTQ_EXPORTER = GPTQExporter()
AWQ_EXPORTER = AWQExporter()
