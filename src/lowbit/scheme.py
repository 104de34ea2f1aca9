"""What is quantized and how: ``QuantSpec`` for one tensor, ``Scheme`` for a model, ``Recipe``.

The scheme says what the numbers mean (the format a runtime must honour); the recipe's steps
say how they were chosen (RTN, GPTQ, ...) and are kept only as provenance. Both are frozen
dataclasses that round-trip through plain dicts and YAML; reading rejects unknown or
misspelled fields with a message that names the field's path and suggests the right name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats import Format, IntFormat, get_format
from lowbit.primitives import SCALE_DTYPES


class FieldError(LowbitError):
    """A field of a spec with a value of the wrong type; readers prefix the field's path."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name, self.detail = name, detail


def show(value: Any) -> str:
    """A value as it would be written in YAML: ``true``, ``null``, ``'64'``, ``4``."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value)


GRANULARITIES = ("tensor", "channel", "group", "token", "head", "cluster")
OBSERVER_NAMES = ("minmax", "moving_average", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is quantized.

    ``granularity``: ``tensor`` (one scale), ``channel`` (one per output channel of a weight),
    ``group`` (``group_size`` consecutive input columns of each output channel; the last group
    may be shorter), ``token`` (dynamic, one per token vector), ``head`` (KV cache: one per
    attention head). ``dynamic`` ranges are computed at run time; static ones come from the
    ``observer`` on calibration data (weights are always observed directly).

    ``outlier_threshold`` (LLM.int8(), dynamic per-token input activations only): the input
    feature dimensions in which some token of the current input exceeds this magnitude skip
    quantization and stay in float; the per-token scales are computed over the other dimensions.
    It is left out of the plain-data form while unset, so files that do not use it stay readable
    by lowbit versions that predate it.

    ``cluster`` (RPTQ, static input activations only): the input channels are grouped into
    ``clusters`` clusters by K-means on their calibration (min, max), and each cluster has one
    scale and zero point (``lowbit.clusters``). ``clusters`` is omitted from the plain data while
    unset, like ``outlier_threshold``.
    """

    format: str = "int4"
    granularity: str = "group"
    group_size: int | None = 128
    symmetric: bool = True
    dynamic: bool = False
    observer: str = "minmax"
    observer_args: Mapping[str, Any] = field(default_factory=dict)
    scale_dtype: str = "float32"
    outlier_threshold: float | None = field(default=None, metadata={"omit_if_default": True})
    clusters: int | None = field(default=None, metadata={"omit_if_default": True})
    # "olive": Olive's outlier-victim pair encoding on the int4/int8 grid (lowbit.olive); left out
    # of the plain-data form while unset, as outlier_threshold
    encoding: str | None = field(default=None, metadata={"omit_if_default": True})

    def __post_init__(self) -> None:
        self._check_types()
        fmt = get_format(self.format)
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity {self.granularity!r} is not one of {list(GRANULARITIES)}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise LowbitError(f"granularity 'group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if not self.symmetric and not isinstance(fmt, IntFormat):
            raise LowbitError(f"{self.format} is a float format: only symmetric=true is possible")
        if self.granularity == "token" and not self.dynamic:
            raise LowbitError("granularity 'token' is computed at run time: set dynamic=true")
        if self.observer not in OBSERVER_NAMES:
            raise LowbitError(f"observer {self.observer!r} is not one of {list(OBSERVER_NAMES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype {self.scale_dtype!r} is not one of {list(SCALE_DTYPES)}")
        if self.outlier_threshold is not None:
            self._check_outlier_threshold()
        self._check_clusters()
        if self.encoding is not None:
            self._check_encoding()

    def _check_clusters(self) -> None:
        k = self.clusters
        if self.granularity != "cluster":
            if k is not None:
                raise LowbitError(f"clusters={k!r} needs granularity 'cluster' (got {self.granularity!r})")
            return
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LowbitError(f"granularity 'cluster' needs a positive integer 'clusters' (e.g. 8), got {k!r}")
        if self.dynamic:
            raise LowbitError("granularity 'cluster' is static (ranges from calibration): set dynamic=false")
        if self.observer != "minmax":
            raise LowbitError("granularity 'cluster' clusters the channels' min-max ranges: use observer 'minmax'")

    def _check_types(self) -> None:
        """YAML gives ``true``, ``"64"`` or ``4`` where another type was meant; none of them may pass
        as something else (``group_size: true`` would otherwise be groups of 1, bool being an int)."""
        for name in ("format", "granularity", "observer", "scale_dtype"):
            if not isinstance(getattr(self, name), str):
                raise FieldError(name, f"expected a string, got {show(getattr(self, name))}")
        for name in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"expected true or false, got {show(getattr(self, name))}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int)):
            raise FieldError("group_size", f"expected an integer, got {show(gs)}")
        if not isinstance(self.observer_args, Mapping):
            raise FieldError(
                "observer_args", f"expected a mapping such as {{maxshrink: 0.2}}, got {show(self.observer_args)}"
            )

    def _check_outlier_threshold(self) -> None:
        t = self.outlier_threshold
        # bool is an int: `outlier_threshold: true` in YAML must not mean a threshold of 1
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise LowbitError(f"outlier_threshold must be a positive finite number (e.g. 6.0), got {t!r}")
        if not (self.dynamic and self.granularity == "token"):
            raise LowbitError(
                "outlier_threshold (LLM.int8() float outlier dimensions) needs dynamic per-token activations: "
                f"set granularity 'token' and dynamic=true (got granularity {self.granularity!r}, "
                f"dynamic={str(self.dynamic).lower()})"
            )
        object.__setattr__(self, "outlier_threshold", float(t))  # 6 and 6.0 describe and compare alike

    def _check_encoding(self) -> None:
        if self.encoding != "olive":
            raise FieldError("encoding", f"the only encoding is 'olive' (or leave it out), got {show(self.encoding)}")
        if self.format not in ("int4", "int8") or not self.symmetric:
            raise LowbitError(
                f"encoding 'olive' pairs values on a symmetric int4 or int8 grid: use format int4 or int8 with "
                f"symmetric=true (got {self.format}, symmetric={str(self.symmetric).lower()})"
            )
        if self.granularity not in ("tensor", "channel") or self.outlier_threshold is not None:
            raise LowbitError(
                "encoding 'olive' takes one MSE-chosen scale per tensor (weights may use one per channel): set "
                f"granularity 'tensor' or 'channel' and no outlier_threshold (got {self.granularity!r})"
            )
        if self.scale_dtype != "float32":
            raise LowbitError(f"encoding 'olive' keeps float32 scales; got scale_dtype {self.scale_dtype!r}")

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def describe(self) -> str:
        """Short human form, e.g. ``int4 g128 sym`` or ``int8 token dyn``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        if self.granularity == "cluster":
            gran = f"{self.clusters}-cluster"
        parts = [self.format, gran, "sym" if self.symmetric else "asym"]
        if self.dynamic:
            parts.append("dyn")
        if self.observer != "minmax":
            parts.append(self.observer)
        if self.scale_dtype != "float32":
            parts.append({"float16": "fp16", "bfloat16": "bf16"}.get(self.scale_dtype, self.scale_dtype) + "-scale")
        if self.outlier_threshold is not None:
            parts.append(f"outliers>{self.outlier_threshold:g}")
        if self.encoding is not None:
            parts.append(self.encoding)
        return " ".join(parts)


@dataclass(frozen=True)
class Override:
    """Different specs for modules matching ``pattern``; ``None`` leaves that tensor in float."""

    pattern: str
    weights: QuantSpec | None
    input_activations: QuantSpec | None


@dataclass(frozen=True)
class Scheme:
    """What is quantized in a model.

    ``targets`` and ``ignore`` are module patterns: ``re:REGEX`` (full match on the module's
    dotted name), a class name such as ``Linear``, or a name suffix such as ``lm_head`` or
    ``mlp.down_proj``. ``ignore`` wins over ``targets``; the first matching override wins.
    """

    weights: QuantSpec | None = None
    input_activations: QuantSpec | None = None
    kv_cache: QuantSpec | None = None
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        self._check_regexes()
        # the overrides' specs obey the same rules as the scheme's own
        pairs = [("", self.weights, self.input_activations)]
        pairs += [(f"override {o.pattern!r}: ", o.weights, o.input_activations) for o in self.overrides]
        for label, weights, acts in pairs:
            if weights is not None and weights.granularity in ("token", "head", "cluster"):
                raise LowbitError(f"{label}weights cannot use granularity {weights.granularity!r}")
            if weights is not None and weights.dynamic:
                raise LowbitError(f"{label}weights are quantized once: dynamic=true is for activations")
            if acts is not None and acts.granularity not in ("tensor", "token", "cluster"):
                raise LowbitError(
                    f"{label}input_activations use granularity 'tensor' (static), 'token' (dynamic) "
                    "or 'cluster' (static, RPTQ)"
                )
            if acts is not None and acts.encoding is not None and not (acts.dynamic and acts.granularity == "tensor"):
                raise LowbitError(
                    f"{label}input_activations with encoding 'olive' are dynamic per tensor: set dynamic=true"
                )
        kv = self.kv_cache
        if kv is not None and kv.granularity not in ("tensor", "head", "token"):
            raise LowbitError("kv_cache uses granularity 'tensor', 'head' or 'token'")
        if kv is not None and kv.encoding is not None:
            raise LowbitError("kv_cache cannot use an encoding: Olive pairs are for weights and input_activations")
        if kv is not None and kv.outlier_threshold is not None:
            # the KV cache quantizer has no float path: a threshold there would be silently ignored
            raise LowbitError(
                "kv_cache cannot use outlier_threshold: float outlier dimensions are for input_activations"
            )

    def _check_regexes(self) -> None:
        """A ``re:`` pattern that does not compile would otherwise fail at the first layer, mid-run."""
        lists = (("targets", self.targets), ("ignore", self.ignore), ("overrides", [o.pattern for o in self.overrides]))
        for where, patterns in lists:
            for p in patterns:
                if p.startswith("re:"):
                    try:
                        re.compile(p[3:])
                    except re.error as e:
                        raise LowbitError(f"{where}: {p!r} is not a valid regular expression ({e})") from None

    def is_target(self, name: str, module: Any) -> bool:
        cls = type(module).__name__
        if any(_matches(p, name, cls) for p in self.ignore):
            return False
        return any(_matches(p, name, cls) for p in self.targets)

    def specs_for(self, name: str, module: Any) -> tuple[QuantSpec | None, QuantSpec | None]:
        """(weights, input_activations) specs for one module, after overrides."""
        cls = type(module).__name__
        for o in self.overrides:
            if _matches(o.pattern, name, cls):
                return o.weights, o.input_activations
        return self.weights, self.input_activations

    def describe(self) -> str:
        bits = []
        if self.weights:
            bits.append(f"W: {self.weights.describe()}")
        if self.input_activations:
            bits.append(f"A: {self.input_activations.describe()}")
        if self.kv_cache:
            bits.append(f"KV: {self.kv_cache.describe()}")
        return "; ".join(bits) or "nothing quantized"


def _matches(pattern: str, name: str, cls: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == cls or name == pattern or name.endswith("." + pattern)


@dataclass(frozen=True)
class Step:
    """One algorithm step of a recipe: its registered name and its parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A scheme and the ordered algorithm steps (transforms, then a quantizer) that realise it."""

    scheme: Scheme
    steps: tuple[Step, ...] = (Step("rtn"),)
    name: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheme": to_dict(self.scheme),
            "steps": [{s.name: dict(s.params)} for s in self.steps],
        }


# --- dict / YAML -----------------------------------------------------------------------------------


def _check_fields(data: Mapping[str, Any], cls: type, where: str) -> None:
    if not isinstance(data, Mapping):
        raise LowbitError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LowbitError(f"{where}: unknown field {key!r}{hint}; valid fields: {', '.join(valid)}")


def spec_from_dict(data: Mapping[str, Any] | None, where: str, base: QuantSpec | None = None) -> QuantSpec | None:
    """Build a QuantSpec; with ``base``, ``data`` only needs the fields that differ."""
    if data is None:
        return None
    _check_fields(data, QuantSpec, where)
    try:
        return dataclasses.replace(base, **data) if base else QuantSpec(**data)
    except FieldError as e:
        raise LowbitError(f"{where}.{e.name}: {e.detail}") from None
    except LowbitError as e:
        raise LowbitError(f"{where}: {e}") from None
    except TypeError as e:
        raise LowbitError(f"{where}: {e}") from None


def _patterns(data: Mapping[str, Any], key: str, default: tuple[str, ...], where: str) -> tuple[str, ...]:
    """A list of module patterns; a bare string would otherwise become a tuple of characters."""
    value = data.get(key, default)
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise LowbitError(f"{where}.{key}: expected a list of module patterns such as [lm_head], got {value!r}")
    return tuple(value)


def scheme_from_dict(data: Mapping[str, Any], where: str = "scheme") -> Scheme:
    _check_fields(data, Scheme, where)
    weights = spec_from_dict(data.get("weights"), f"{where}.weights")
    acts = spec_from_dict(data.get("input_activations"), f"{where}.input_activations")
    overrides = []
    given = data.get("overrides", ()) or ()
    if not isinstance(given, list | tuple):
        raise LowbitError(
            f"{where}.overrides: expected a list such as [{{pattern: ..., weights: ...}}], got {show(given)}"
        )
    for i, o in enumerate(given):
        w_o = f"{where}.overrides[{i}]"
        _check_fields(o, Override, w_o)
        if "pattern" not in o:
            raise LowbitError(f"{w_o}: an override needs a 'pattern'")
        ow = spec_from_dict(o["weights"], f"{w_o}.weights", weights) if "weights" in o else weights
        oa = (
            spec_from_dict(o["input_activations"], f"{w_o}.input_activations", acts)
            if "input_activations" in o
            else acts
        )
        overrides.append(Override(str(o["pattern"]), ow, oa))
    kv = spec_from_dict(data.get("kv_cache"), f"{where}.kv_cache")  # its errors name their own path
    targets = _patterns(data, "targets", ("Linear",), where)
    ignore = _patterns(data, "ignore", ("lm_head",), where)
    try:
        return Scheme(
            weights=weights,
            input_activations=acts,
            kv_cache=kv,
            targets=targets,
            ignore=ignore,
            overrides=tuple(overrides),
        )
    except LowbitError as e:
        raise LowbitError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data form of a QuantSpec, Scheme or Recipe (lists for tuples, dicts for mappings)."""
    if isinstance(obj, Recipe):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit_if_default") and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def steps_from_list(data: Any, where: str = "steps") -> tuple[Step, ...]:
    """``[{"rtn": {}}, {"gptq": {"block_size": 128}}]`` or ``["rtn"]`` -> Steps."""
    if not isinstance(data, list) or not data:
        raise LowbitError(f"{where}: expected a non-empty list of steps such as [{{rtn: {{}}}}]")
    steps = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            steps.append(Step(item))
        elif isinstance(item, Mapping) and len(item) == 1:
            ((name, params),) = item.items()
            if params is not None and not isinstance(params, Mapping):
                raise LowbitError(f"{where}[{i}]: parameters of {name!r} must be a mapping")
            steps.append(Step(str(name), dict(params or {})))
        else:
            raise LowbitError(f"{where}[{i}]: a step is a name or a one-key mapping {{name: {{params}}}}")
    return tuple(steps)


_SPEC_KEYS = ("weights", "input_activations", "kv_cache")


def merge_scheme(base: dict[str, Any], changes: Any, where: str) -> dict[str, Any]:
    """``base`` (a scheme's plain data) with ``changes`` applied: the specs (weights, input
    activations, KV cache) field by field, so ``weights: {group_size: 64}`` keeps the rest of the
    preset's weight spec; ``null`` removes a spec; targets, ignore and overrides are replaced."""
    _check_fields(changes, Scheme, where)
    merged = dict(base)
    for key, value in changes.items():
        if key in _SPEC_KEYS and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


def derived_name(base: Recipe, recipe: Recipe) -> str:
    """The name of ``base`` changed into ``recipe``: ``w4a16-g64`` for a new group size,
    ``w4a16-rtn`` for another quantizer, ``w4a16-custom`` for any other change."""
    if recipe.scheme == base.scheme and recipe.steps == base.steps:
        return base.name
    parts = [base.name]
    rest = base.scheme
    w, bw = recipe.scheme.weights, base.scheme.weights
    if w is not None and bw is not None and w.granularity == "group" and w.group_size != bw.group_size:
        parts.append(f"g{w.group_size}")
        rest = _regrouped(base.scheme, w.group_size or 0)
    if recipe.steps != base.steps:
        parts.append("+".join(s.name for s in recipe.steps if s not in base.steps) or "steps")
    if recipe.scheme != rest:
        parts.append("custom")
    return "-".join(parts)


def _regrouped(scheme: Scheme, group_size: int) -> Scheme:
    """``scheme`` with its weights and its overrides' weights in groups of ``group_size``."""

    def regroup(spec: QuantSpec | None) -> QuantSpec | None:
        if spec is None or spec.granularity == "tensor":
            return spec
        return dataclasses.replace(spec, granularity="group", group_size=group_size)

    overrides = tuple(dataclasses.replace(o, weights=regroup(o.weights)) for o in scheme.overrides)
    return dataclasses.replace(scheme, weights=regroup(scheme.weights), overrides=overrides)


def with_group_size(recipe: Recipe, group_size: int) -> Recipe:
    """``recipe`` with its weights (and every override's weights) in groups of ``group_size``
    input columns, named as changed (``w4a16-g64``); per-channel weights become grouped."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise LowbitError(f"group size must be a positive integer, got {group_size!r}")
    if recipe.scheme.weights is None:
        raise LowbitError(f"recipe {recipe.name!r} quantizes no weights, so a group size does not apply")
    changed = dataclasses.replace(recipe, scheme=_regrouped(recipe.scheme, group_size))
    return dataclasses.replace(changed, name=derived_name(recipe, changed))
