"""What every exporter shares: the exporter interface, refusals that name layers, atomic output.

An exporter reads a model whose quantized linears are :class:`~lowbit.modules.QuantLinear`
(from :func:`lowbit.checkpoint.load_quantized`, or straight from :func:`lowbit.api.quantize`),
checks that the target format can hold every layer's grid, and writes the files into a fresh
directory. It never changes the model. ``check`` runs before anything is written, so a refused
export leaves nothing behind; ``write`` fills a temporary directory that becomes ``--out`` only
when complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from lowbit.errors import LowbitError
from lowbit.kvcache import KVQuantizer
from lowbit.modules import QuantLinear
from lowbit.scheme import QuantSpec


@dataclass(frozen=True)
class Problem:
    """Why one layer (or ``kv_cache`` / ``model``) cannot go into a format.

    ``prop`` names the property (``weights format``, ``group size``, ``input activations`` ...),
    ``detail`` what this layer has and what the format would need. Layers with the same
    ``(prop, detail)`` are reported together.
    """

    layer: str
    prop: str
    detail: str


@dataclass
class ExportResult:
    out: Path
    format: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lossy steps, layers kept in float, ...


class Exporter(ABC):
    """One target format. Subclasses set ``name``/``description`` and implement both methods."""

    name: str = ""
    description: str = ""
    options_help: ClassVar[Mapping[str, str]] = {}  # option -> what it does (``lowbit export --opt KEY=VALUE``)
    refusal_hint: str = ""  # the last line of a refusal: what to do instead (default: re-quantize)

    @abstractmethod
    def check(self, model: nn.Module, options: Mapping[str, str]) -> list[Problem]:
        """Every reason ``model`` cannot be written (empty: it can). Must not write anything."""

    @abstractmethod
    def write(self, model: nn.Module, tokenizer: Any, out: Path, options: Mapping[str, str]) -> list[str]:
        """Write the files into the (empty, temporary) directory ``out``; return notes for the user."""


def quantized_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """(name, module) of every QuantLinear, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def kv_spec(model: nn.Module) -> QuantSpec | None:
    """The KV-cache spec of the model's attention modules, if the KV cache is quantized."""
    for m in model.modules():
        kvq = getattr(m, "lowbit_kv", None)
        if isinstance(kvq, KVQuantizer):
            return kvq.spec
    return None


def kv_quantizers(model: nn.Module) -> list[tuple[str, KVQuantizer]]:
    """(attention module name, its KV quantizer) in model order."""
    out = []
    for n, m in model.named_modules():
        kvq = getattr(m, "lowbit_kv", None)
        if isinstance(kvq, KVQuantizer):
            out.append((n, kvq))
    return out


def dividing_groups(in_features: int) -> str:
    """The usual group sizes (powers of two from 32 to 256) that divide ``in_features``, for hints."""
    sizes = [g for g in (256, 128, 64, 32) if in_features % g == 0]
    return f"groups of {' or '.join(map(str, sizes))} divide it" if sizes else "use per-channel weights"


def short_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def refusal(fmt: str, problems: list[Problem], hint: str = "") -> LowbitError:
    """One error listing each property that blocks the export and the layers that have it."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in problems:
        groups[(p.prop, p.detail)].append(p.layer)
    lines = [f"cannot export to {fmt}:"]
    for (prop, detail), layers in groups.items():
        lines.append(f"  - {prop}: {detail} [{len(layers)} layer(s): {short_list(layers)}]")
    lines.append(hint or f"re-quantize with a scheme {fmt} can hold (`lowbit export --help`), or choose another format")
    return LowbitError("\n".join(lines))


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``["type=Q4_K", ...]`` -> ``{"type": "Q4_K"}``; a malformed pair is an error."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LowbitError(f"export option {pair!r} is not KEY=VALUE (e.g. --opt type=Q4_K)")
        options[key.strip()] = value.strip()
    return options


def check_options(exporter: Exporter, options: Mapping[str, str]) -> None:
    unknown = sorted(set(options) - set(exporter.options_help))
    if unknown:
        known = ", ".join(sorted(exporter.options_help)) or "none"
        raise LowbitError(f"{exporter.name} has no option {', '.join(unknown)}; its options: {known}")


def representation_problems(model: nn.Module) -> list[Problem]:
    """Layers whose numbers no export format holds: Olive's outlier-victim pair codes (weights or
    activations) and LoRC's low-rank error factors. ``export_model`` refuses them for every format,
    before the exporter's own check (which reads codes as plain grid values)."""
    problems = []
    for name, m in quantized_linears(model):
        qw = m.qweight
        if qw is not None and qw.spec.encoding is not None:
            detail = f"{qw.spec.describe()}: no runtime format decodes Olive's outlier-victim pairs"
            problems.append(Problem(name, "weights encoding", detail))
        if m.act is not None and m.act.spec.encoding is not None:
            detail = f"{m.act.spec.describe()}: no runtime format quantizes activations in Olive's pairs"
            problems.append(Problem(name, "input activations encoding", detail))
        if qw is not None and qw.lorc_u is not None:
            detail = f"rank {qw.lorc_u.shape[1]} fp16 factors beside the weight: the format has no place for them"
            problems.append(Problem(name, "LoRC factors", detail))
    return problems
