"""Checks that run before any work: everything about a recipe that the model's shape decides.

The model is built as a skeleton on the meta device from its config (no weights are read, it
takes a second even for a large model), so a pattern that matches no layer, a group size that
does not divide a layer's input width or a disk too small for the output is refused before the
weights or the calibration text are loaded.

- :func:`check_quantize`: all of the below, as ``lowbit quantize`` runs them.
- :func:`skeleton`: the meta-device model of a ``load_model`` spec (Hub id, directory, GGUF, demo).
- :func:`check_recipe`: the scheme's patterns and group sizes against the model's linear layers,
  with the pipeline's own target selection, so the check and the run agree.
- :func:`estimate_output_bytes` and :func:`check_disk`: room for the checkpoint.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec, Recipe, Scheme, _matches

# patterns lowbit puts in every scheme: a model without an ``lm_head`` module is not an error
_DEFAULT_PATTERNS = {"targets": ("Linear",), "ignore": ("lm_head",)}
_GROUP_CANDIDATES = (256, 128, 64, 32, 16)


def check_quantize(
    model_spec: str, recipe: Recipe, out: str | Path, sources: list[str], model: nn.Module | None = None
) -> None:
    """What ``lowbit quantize`` checks before loading anything: the text ``sources`` exist, the
    recipe fits the model's layers (from its config alone; ``model`` is its skeleton when the
    caller has built it already), the disk has room for the output."""
    from lowbit.data import check_source

    for source in dict.fromkeys(sources):
        check_source(source)
    model = skeleton(model_spec) if model is None else model
    check_recipe(recipe, model)
    check_disk(out, estimate_output_bytes(recipe, model))


def skeleton(spec: str, trust_remote_code: bool = False) -> nn.Module:
    """The model ``spec`` names (as ``models.load_model`` takes it), on the meta device: layer names
    and shapes, no weights read. Missing or broken model files are reported as ``load_model`` does."""
    from lowbit.models import meta_skeleton, no_remote_code

    with no_remote_code(spec, trust_remote_code):
        config = _config(spec, trust_remote_code)
    try:
        return meta_skeleton(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # an architecture transformers has no causal LM class for
        raise LowbitError(f"cannot build a causal language model from the config of {spec!r}: {exc}") from exc


def _config(spec: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    from lowbit import models

    kind, where = models.resolve_spec(spec)
    if kind == "gguf":
        return _gguf_config(Path(where))
    try:
        return AutoConfig.from_pretrained(str(where), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
            raise  # models.no_remote_code in skeleton says what to do
        if kind == "dir":
            raise LowbitError(f"could not read the model config in {spec!r}: {exc}") from exc
        raise LowbitError(
            f"model {spec!r} is not a local path and its config could not be fetched from the Hugging Face Hub "
            f"(check the id, your network, and HF_HUB_OFFLINE): {type(exc).__name__}: {exc}"
        ) from exc


def _gguf_config(path: Path) -> Any:
    """The config of a GGUF model: from its cached conversion if there is one, else its metadata."""
    from transformers import AutoConfig

    from lowbit import models

    converted = models.converted_dir(path)
    if (converted / "config.json").is_file():
        return AutoConfig.from_pretrained(str(converted), trust_remote_code=False)
    models._check_magic(path)
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise LowbitError(
            f"cannot read the model config from the GGUF file {path} ({type(exc).__name__}: {exc})"
        ) from exc


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def targeted_layers(
    model: nn.Module, recipe: Recipe
) -> dict[str, tuple[nn.Linear, QuantSpec | None, QuantSpec | None]]:
    """``{full name: (linear, weight spec, activation spec)}`` of every layer the pipeline will
    quantize: its own selection (decoder blocks only, ``Scheme.is_target``, ``specs_for``)."""
    from lowbit.archs import decoder_blocks, get_arch
    from lowbit.pipeline import _targets

    arch = get_arch(model)
    out = {}
    for i, block in enumerate(decoder_blocks(model, arch)):
        prefix = f"{arch.blocks}.{i}"
        targets, specs = _targets(block, prefix, recipe)
        for name, linear in targets.items():
            out[f"{prefix}.{name}"] = (linear, *specs[name])
    return out


def layer_summary(names: list[str]) -> str:
    """The model's layer names, short: the distinct suffixes after the block index, and one full name."""
    suffixes = list(dict.fromkeys(re.split(r"\.\d+\.", n)[-1] for n in names))
    example = next((n for n in names if re.search(r"\.\d+\.", n)), names[0] if names else "")
    return f"{', '.join(suffixes)} (e.g. {example})"


def check_recipe(recipe: Recipe, model: nn.Module) -> None:
    """Refuse a recipe that cannot run as meant on ``model`` (a skeleton or the real one): a
    target, ignore entry or override pattern that matches no linear layer, or a group size that
    does not divide (or exceeds) the input width of a layer it applies to."""
    linears = linear_layers(model)
    _check_patterns(recipe.scheme, linears)
    targeted = targeted_layers(model, recipe)
    if not targeted and (recipe.scheme.weights or recipe.scheme.input_activations):
        raise LowbitError(
            f"the recipe quantizes no linear layer inside the decoder blocks (targets {list(recipe.scheme.targets)}, "
            f"ignore {list(recipe.scheme.ignore)}, overrides); the model's linear layers are "
            f"{layer_summary(list(linears))}"
        )
    _check_groups(targeted)


def _check_patterns(scheme: Scheme, linears: dict[str, nn.Linear]) -> None:
    lists = {
        "targets": scheme.targets,
        "ignore": scheme.ignore,
        "overrides": tuple(o.pattern for o in scheme.overrides),
    }
    for where, patterns in lists.items():
        for p in patterns:
            if p in _DEFAULT_PATTERNS.get(where, ()):
                continue
            if not any(_matches(p, name, type(m).__name__) for name, m in linears.items()):
                raise LowbitError(
                    f"scheme.{where}: {p!r} matches no linear layer of the model; its linear layers are "
                    f"{layer_summary(list(linears))}"
                )


def _check_groups(targeted: dict[str, tuple[nn.Linear, QuantSpec | None, QuantSpec | None]]) -> None:
    bad: dict[tuple[int, int], list[str]] = defaultdict(list)  # (group, width) -> layers
    widths: dict[int, set[int]] = defaultdict(set)  # group -> every width it applies to
    for name, (linear, w, _) in targeted.items():
        if w is None or w.granularity != "group" or w.group_size is None:
            continue
        gs, width = w.group_size, linear.in_features
        widths[gs].add(width)
        if width % gs or gs > width:
            bad[(gs, width)].append(name)
    if not bad:
        return
    lines = []
    for gs in sorted({g for g, _ in bad}):
        small: list[str] = []  # widths the groups do not divide
        large: list[str] = []  # widths smaller than one group
        for (g, width), names in sorted(bad.items()):
            if g == gs:
                phrase = f"the {width} input columns of {len(names)} layer(s) (e.g. {names[0]})"
                (large if gs > width else small).append(phrase)
        parts = [f"do not divide {' or '.join(small)}"] if small else []
        parts += [f"are larger than {' or '.join(large)}"] if large else []
        common = math.gcd(*widths[gs])
        fits = [c for c in _GROUP_CANDIDATES if common % c == 0 and c < gs][:2]
        hint = (
            f"groups of {' or '.join(map(str, fits))} divide every targeted width"
            if fits
            else "no usual group size divides every targeted width; use granularity 'channel'"
        )
        lines.append(f"groups of {gs} {' and '.join(parts)}; {hint}")
    raise LowbitError("; ".join(lines) + " (lowbit quantizes whole groups only)")


def fitting_group_size(recipe: Recipe, model: nn.Module) -> int | None:
    """For a default recipe on a model its group size does not fit: the largest usual group size,
    no larger than the recipe's, that divides every targeted layer's input width (``None`` when
    the recipe's own fits, or when none does, which ``check_recipe`` then reports)."""
    w = recipe.scheme.weights
    if w is None or w.granularity != "group" or w.group_size is None:
        return None
    widths = {
        linear.in_features
        for linear, spec, _ in targeted_layers(model, recipe).values()
        if spec is not None and spec.granularity == "group"
    }
    if not widths or all(width % w.group_size == 0 for width in widths):
        return None
    common = math.gcd(*widths)
    return next((c for c in _GROUP_CANDIDATES if c <= w.group_size and common % c == 0), None)


def estimate_output_bytes(recipe: Recipe, model: nn.Module) -> int:
    """About how many bytes the checkpoint of ``model`` quantized with ``recipe`` takes: codes,
    scales and zero points of targeted weights, every other tensor in float32 (shared ones once)."""
    quantized = {id(lin.weight): w for lin, w, _ in targeted_layers(model, recipe).values() if w is not None}
    # OWQ's float16 columns: about ``extra_bits`` more bits per quantized weight
    extra_bits = max((float(s.params.get("extra_bits", 0.1)) for s in recipe.steps if s.name == "owq"), default=0.0)
    total = 0
    for p in dict.fromkeys(model.parameters()):  # tied weights count once
        spec = quantized.get(id(p))
        if spec is None or p.dim() != 2:
            total += p.numel() * 4
            continue
        out, inp = p.shape
        groups = {"tensor": 1, "channel": out}.get(spec.granularity, out * math.ceil(inp / (spec.group_size or inp)))
        params = 2 if spec.scale_dtype in ("float16", "bfloat16") else 4
        total += math.ceil(p.numel() * (spec.bits + extra_bits) / 8) + groups * (params + (0 if spec.symmetric else 4))
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def check_disk(out: str | Path, nbytes: int, margin: float = 0.1) -> None:
    """Refuse when the file system that will hold ``out`` has less room than ``nbytes`` plus a margin."""
    where = Path(out).expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    need = int(nbytes * (1 + margin)) + 2**20
    if free < need:
        raise LowbitError(
            f"not enough disk space for {out}: the output needs about {need / 2**20:.0f} MiB "
            f"(estimated, with a {margin:.0%} margin) and {where} has {free / 2**20:.0f} MiB free"
        )
