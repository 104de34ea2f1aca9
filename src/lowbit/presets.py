"""Named presets: the schemes people ask for by name, each with the recipe that realises it.

Every preset is RTN for now; later methods (GPTQ, AWQ, SmoothQuant, ...) change a preset's
steps, never what its numbers mean.
"""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

_W8_CH = QuantSpec("int8", "channel", None, symmetric=True)
_A8_TOKEN = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)
_A8_STATIC = QuantSpec("int8", "tensor", None, symmetric=True, observer="minmax")
_FP8_CH = QuantSpec("fp8_e4m3", "channel", None)
_FP8_TOKEN = QuantSpec("fp8_e4m3", "token", None, dynamic=True)
_KV8 = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)


def _g(fmt: str, group: int, symmetric: bool, scale_dtype: str = "float16") -> QuantSpec:
    """Group-wise weights; fp16 scales, as the GPTQ/AWQ/compressed-tensors files that runtimes load store them."""
    return QuantSpec(fmt, "group", group, symmetric=symmetric, scale_dtype=scale_dtype)


PRESETS: dict[str, tuple[str, Scheme]] = {
    "w8a16": ("8-bit integer weights per output channel, symmetric", Scheme(weights=_W8_CH)),
    "w4a16": ("4-bit integer weights, groups of 128, symmetric", Scheme(weights=_g("int4", 128, True))),
    "w4a16-asym": (
        "4-bit integer weights, groups of 128, asymmetric (zero point)",
        Scheme(weights=_g("uint4", 128, False)),
    ),
    "w4a16-g32": (
        "4-bit integer weights, groups of 32, asymmetric. NOTE: the demo model's weights were stored on "
        "a 4-bit group-32 grid (with a float minimum); read results of this preset on it with care",
        Scheme(weights=_g("uint4", 32, False)),
    ),
    "w4a16-ch": (
        "4-bit integer weights per output channel, asymmetric",
        Scheme(weights=QuantSpec("uint4", "channel", None, symmetric=False)),
    ),
    "w3a16": ("3-bit integer weights, groups of 128, asymmetric", Scheme(weights=_g("uint3", 128, False))),
    "w2a16": ("2-bit integer weights, groups of 32, asymmetric", Scheme(weights=_g("uint2", 32, False))),
    "w8a8": (
        "int8 weights per channel + int8 activations, dynamic per token",
        Scheme(weights=_W8_CH, input_activations=_A8_TOKEN),
    ),
    "w8a8-static": (
        "int8 weights per channel + int8 activations, static per tensor (min-max)",
        Scheme(weights=_W8_CH, input_activations=_A8_STATIC),
    ),
    "w8a8-fp8": (
        "FP8 E4M3 weights per channel + FP8 E4M3 activations, dynamic per token",
        Scheme(weights=_FP8_CH, input_activations=_FP8_TOKEN),
    ),
    "w4a8": (
        "4-bit weights, groups of 128 + int8 activations, dynamic per token",
        Scheme(weights=_g("int4", 128, True), input_activations=_A8_TOKEN),
    ),
    "w6a16-fp6": (
        "FP6 E3M2 weights per output channel",
        Scheme(weights=QuantSpec("fp6_e3m2", "channel", None)),
    ),
    "mxfp4": (
        "FP4 E2M1 weights, groups of 32, power-of-two scales (OCP MX)",
        Scheme(weights=_g("fp4_e2m1", 32, True, "pow2")),
    ),
    "kv8": ("int8 KV cache, dynamic per token and head; weights in float", Scheme(kv_cache=_KV8)),
    "w8a8-kv8": (
        "w8a8 plus an int8 KV cache",
        Scheme(weights=_W8_CH, input_activations=_A8_TOKEN, kv_cache=_KV8),
    ),
}

DEFAULT_PRESET = "w4a16"


def get_preset(name: str) -> Recipe:
    """The recipe of a named preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise LowbitError(f"unknown preset {name!r}; run `lowbit presets` to list them ({', '.join(PRESETS)})")
    return Recipe(scheme=PRESETS[name][1], steps=(Step("rtn"),), name=name)
