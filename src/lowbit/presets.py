"""Named presets: the schemes people ask for by name, each with the recipe that realises it.

Weight-only integer presets are GPTQ with act-order and MSE-clipped group ranges (the setup of
"Give Me BF16 or Give Me Death"); the rest are RTN until their methods land. A later method
changes a preset's steps, never what its numbers mean.
"""

from __future__ import annotations

from typing import NamedTuple

from lowbit.errors import LowbitError
from lowbit.scheme import QuantSpec, Recipe, Scheme, Step

_MSE = "mse"  # weight ranges: shrink search for the lowest quantization error (clipping)
# as llm-compressor's MSE observer ("Give Me BF16 or Give Me Death"): shrink the range by up to
# 20% in 1% steps and keep the one with the least squared error (the GPTQ reference searches
# to 80%, at 4x the cost)
_MSE_ARGS = {"maxshrink": 0.2}
_RTN = (Step("rtn"),)
# act-order with static groups: the quality of act-order, and files that need no g_idx (which
# llama.cpp's formats cannot express and which slows other runtimes' kernels)
_GPTQ = (Step("gptq", {"act_order": True, "static_groups": True}),)
_OWQ = (Step("owq", {"act_order": True, "static_groups": True}),)
# W8A8-INT as in "Give Me BF16 or Give Me Death": SmoothQuant, then GPTQ on per-channel weights
_SQ_GPTQ = (Step("smoothquant", {"alpha": 0.5}), *_GPTQ)


class Preset(NamedTuple):
    description: str
    scheme: Scheme
    steps: tuple[Step, ...] = _RTN


_W8_CH = QuantSpec("int8", "channel", None, symmetric=True)
_W8_CH_MSE = QuantSpec("int8", "channel", None, symmetric=True, observer=_MSE, observer_args=_MSE_ARGS)
_A8_TOKEN = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)
_A8_STATIC = QuantSpec("int8", "tensor", None, symmetric=True, observer="minmax")
_FP8_CH = QuantSpec("fp8_e4m3", "channel", None)
_FP8_TOKEN = QuantSpec("fp8_e4m3", "token", None, dynamic=True)
_KV8 = QuantSpec("int8", "token", None, symmetric=True, dynamic=True)

# RPTQ (Yuan et al. 2023): asymmetric static activations, one scale and zero point per cluster
_A8_CLUSTER = QuantSpec("uint8", "cluster", None, symmetric=False, clusters=32)
_RPTQ_GPTQ = (Step("rptq"), *_GPTQ)


def _g(fmt: str, group: int, symmetric: bool, scale_dtype: str = "float16", observer: str = _MSE) -> QuantSpec:
    """Group-wise weights; fp16 scales, as the GPTQ/AWQ/compressed-tensors files that runtimes load store them."""
    args = _MSE_ARGS if observer == _MSE else {}
    return QuantSpec(fmt, "group", group, symmetric, scale_dtype=scale_dtype, observer=observer, observer_args=args)


PRESETS: dict[str, Preset] = {
    "w8a16": Preset("8-bit integer weights per output channel, symmetric, GPTQ", Scheme(weights=_W8_CH_MSE), _GPTQ),
    "w4a16": Preset(
        "4-bit integer weights, groups of 128, symmetric, GPTQ", Scheme(weights=_g("int4", 128, True)), _GPTQ
    ),
    "w4a16-rtn": Preset(
        "w4a16 rounded to nearest (no GPTQ): the baseline GPTQ is measured against",
        Scheme(weights=_g("int4", 128, True)),
    ),
    "w4a16-asym": Preset(
        "4-bit integer weights, groups of 128, asymmetric (zero point), GPTQ",
        Scheme(weights=_g("uint4", 128, False)),
        _GPTQ,
    ),
    "w4a16-g32": Preset(
        "4-bit integer weights, groups of 32, asymmetric, GPTQ. NOTE: the demo model's weights were stored on "
        "a 4-bit group-32 grid (with a float minimum); read results of this preset on it with care",
        Scheme(weights=_g("uint4", 32, False)),
        _GPTQ,
    ),
    "w4a16-ch": Preset(
        "4-bit integer weights per output channel, asymmetric, GPTQ",
        Scheme(weights=QuantSpec("uint4", "channel", None, symmetric=False, observer=_MSE, observer_args=_MSE_ARGS)),
        _GPTQ,
    ),
    "w4a16-awq": Preset(
        "AWQ: activation-aware per-channel scales and clipping, then 4-bit groups of 128, asymmetric (RTN)",
        Scheme(weights=_g("uint4", 128, False, observer="minmax")),
        (Step("awq"), Step("rtn")),
    ),
    "w4a16-owq": Preset(
        "OWQ: w4a16-ch plus the most sensitive input columns kept in fp16 (about 0.1 extra bits per weight)",
        Scheme(weights=QuantSpec("uint4", "channel", None, symmetric=False, observer=_MSE, observer_args=_MSE_ARGS)),
        _OWQ,
    ),
    "w3a16": Preset(
        "3-bit integer weights, groups of 128, asymmetric, GPTQ", Scheme(weights=_g("uint3", 128, False)), _GPTQ
    ),
    "w3a16-g32": Preset(
        "3-bit integer weights, groups of 32, asymmetric, GPTQ", Scheme(weights=_g("uint3", 32, False)), _GPTQ
    ),
    "w2a16": Preset(
        "2-bit integer weights, groups of 32, asymmetric, GPTQ", Scheme(weights=_g("uint2", 32, False)), _GPTQ
    ),
    "w8a8": Preset(
        "int8 weights per channel + int8 activations, dynamic per token; SmoothQuant (alpha 0.5) then GPTQ",
        Scheme(weights=_W8_CH_MSE, input_activations=_A8_TOKEN),
        _SQ_GPTQ,
    ),
    "w8a8-static": Preset(
        "int8 weights per channel + int8 activations, static per tensor (min-max); SmoothQuant then GPTQ",
        Scheme(weights=_W8_CH_MSE, input_activations=_A8_STATIC),
        _SQ_GPTQ,
    ),
    "w8a8-fp8": Preset(
        "FP8 E4M3 weights per channel + FP8 E4M3 activations, dynamic per token",
        Scheme(weights=_FP8_CH, input_activations=_FP8_TOKEN),
    ),
    "w4a8": Preset(
        "4-bit weights, groups of 128 + int8 activations, dynamic per token; SmoothQuant then GPTQ",
        Scheme(weights=_g("int4", 128, True), input_activations=_A8_TOKEN),
        _SQ_GPTQ,
    ),
    "w6a16-fp6": Preset("FP6 E3M2 weights per output channel", Scheme(weights=QuantSpec("fp6_e3m2", "channel", None))),
    "mxfp4": Preset(
        "FP4 E2M1 weights, groups of 32, power-of-two scales (OCP MX)",
        Scheme(weights=_g("fp4_e2m1", 32, True, "pow2", observer="minmax")),
    ),
    "kv8": Preset("int8 KV cache, dynamic per token and head; weights in float", Scheme(kv_cache=_KV8)),
    "w8a8-kv8": Preset(
        "w8a8 plus an int8 KV cache",
        Scheme(weights=_W8_CH, input_activations=_A8_TOKEN, kv_cache=_KV8),
    ),
    "llm-int8": Preset(
        "LLM.int8(): int8 weights per channel (absmax) + int8 activations per token, input dims above 6.0 kept in "
        "float",
        Scheme(
            weights=QuantSpec("int8", "channel", None, symmetric=True),
            input_activations=QuantSpec("int8", "token", None, symmetric=True, dynamic=True, outlier_threshold=6.0),
        ),
    ),
    "w4a8-rptq": Preset(
        "RPTQ: 4-bit weights, groups of 128 (GPTQ) + uint8 activations, static, one range per cluster of channels "
        "(32 K-means clusters on the channels' min/max, reordered so each cluster is contiguous)",
        Scheme(weights=_g("int4", 128, True), input_activations=_A8_CLUSTER),
        _RPTQ_GPTQ,
    ),
    "w8a8-rptq": Preset(
        "RPTQ: int8 weights per channel (GPTQ) + uint8 activations, static, one range per cluster of channels "
        "(32 K-means clusters, reordered)",
        Scheme(weights=_W8_CH_MSE, input_activations=_A8_CLUSTER),
        _RPTQ_GPTQ,
    ),
    "w4a16-mofq": Preset(
        "MoFQ: per layer INT4 or FP4 (E2M1) weights, groups of 128, whichever gives the lower layer output error "
        "on calibration data (RTN)",
        Scheme(weights=_g("int4", 128, True)),
        (Step("mofq", {"metric": "layer"}),),
    ),
    "w8a8-mofq": Preset(
        "MoFQ: per layer INT8 or FP8 (E4M3) for weights (per channel) and activations (dynamic per token) together, "
        "whichever gives the lower layer output error on calibration data (RTN)",
        Scheme(weights=_W8_CH_MSE, input_activations=_A8_TOKEN),
        (Step("mofq", {"metric": "layer"}),),
    ),
}

# Olive (ISCA 2023): outlier-victim pairs on int grids, one MSE-chosen scale per weight tensor,
# activations dynamic per tensor (lowbit.olive)
_OLIVE_W = {b: QuantSpec(f"int{b}", "tensor", None, symmetric=True, encoding="olive") for b in (4, 8)}
_OLIVE_A = {b: QuantSpec(f"int{b}", "tensor", None, symmetric=True, dynamic=True, encoding="olive") for b in (4, 8)}
# ZeroQuant-FP: FP4 E2M1 weights with power-of-two scales (castable to FP8), FP8 E4M3 activations per token
_ZQFP_W = _g("fp4_e2m1", 128, True, "pow2", observer="minmax")
PRESETS.update(
    {
        "w4a4-olive": Preset(
            "Olive: int4 weights (per tensor, MSE scale) and int4 activations (dynamic per tensor) in "
            "outlier-victim pairs, outliers in E2M1 abfloat",
            Scheme(weights=_OLIVE_W[4], input_activations=_OLIVE_A[4]),
            (Step("olive"),),
        ),
        "w8a8-olive": Preset(
            "Olive: int8 weights (per tensor, MSE scale) and int8 activations (dynamic per tensor) in "
            "outlier-victim pairs, outliers in E4M3 abfloat",
            Scheme(weights=_OLIVE_W[8], input_activations=_OLIVE_A[8]),
            (Step("olive"),),
        ),
        "w4a8-fp": Preset(
            "ZeroQuant-FP: FP4 E2M1 weights in groups of 128 with power-of-two scales (cast to FP8 exactly) + "
            "FP8 E4M3 activations, dynamic per token",
            Scheme(weights=_ZQFP_W, input_activations=_FP8_TOKEN),
            (Step("zqfp"),),
        ),
        "w4a8-fp-lorc": Preset(
            "w4a8-fp plus LoRC: rank-8 fp16 factors of each weight's quantization error (ZeroQuant-V2)",
            Scheme(weights=_ZQFP_W, input_activations=_FP8_TOKEN),
            (Step("zqfp"), Step("lorc", {"rank": 8})),
        ),
    }
)
# LUT-GEMM's binary-coding quantization: groups of 64 (128 does not divide the demo's 576-wide
# layers); the uint format only names the bit count, the weights are BCQ binary codes with fp16
# alphas and offset per group (lowbit.bcq), not a uniform grid
_BCQ = (Step("bcq", {"rounds": 10, "init": "best"}),)
PRESETS["w3a16-bcq"] = Preset(
    "LUT-GEMM BCQ: 3 binary planes, groups of 64, fp16 alphas and offset (about 4 bits/weight); "
    "runs in lowbit (eval, LUT-GEMM), no export format holds it",
    Scheme(weights=_g("uint3", 64, False, observer="minmax")),
    _BCQ,
)
PRESETS["w2a16-bcq"] = Preset(
    "LUT-GEMM BCQ: 2 binary planes, groups of 64, fp16 alphas and offset (about 2.75 bits/weight); "
    "runs in lowbit (eval, LUT-GEMM), no export format holds it",
    Scheme(weights=_g("uint2", 64, False, observer="minmax")),
    _BCQ,
)
# learned rounding on GPTQ's grid (AdaRound with BRECQ's block target, see algorithms/adaround.py):
# GPTQ fixes the scales and a first rounding, the block reconstruction relearns the rounding
_AR = (*_GPTQ, Step("adaround"))
PRESETS.update(
    {
        "w4a16-ar": Preset(
            "w4a16 (4-bit groups of 128, symmetric) with GPTQ, then AdaRound on the block output (BRECQ)",
            Scheme(weights=_g("int4", 128, True)),
            _AR,
        ),
        "w3a16-ar": Preset(
            "w3a16 (3-bit groups of 128, asymmetric) with GPTQ, then AdaRound on the block output (BRECQ)",
            Scheme(weights=_g("uint3", 128, False)),
            _AR,
        ),
        "w2a16-ar": Preset(
            "w2a16 (2-bit groups of 32, asymmetric) with GPTQ, then AdaRound on the block output (BRECQ)",
            Scheme(weights=_g("uint2", 32, False)),
            _AR,
        ),
        "w4a8-ar": Preset(
            "w4a8 (SmoothQuant, GPTQ), then AdaRound on the block output with activations fake-quantized per token",
            Scheme(weights=_g("int4", 128, True), input_activations=_A8_TOKEN),
            (*_SQ_GPTQ, Step("adaround")),
        ),
        "w4a16-signround": Preset(
            "w4a16 (4-bit groups of 128, symmetric) rounded by SignRound (auto-round) on the block output",
            Scheme(weights=_g("int4", 128, True)),
            (*_RTN, Step("signround")),
        ),
    }
)

DEFAULT_PRESET = "w4a16"


def get_preset(name: str) -> Recipe:
    """The recipe of a named preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise LowbitError(f"unknown preset {name!r}; run `lowbit presets` to list them ({', '.join(PRESETS)})")
    preset = PRESETS[name]
    return Recipe(scheme=preset.scheme, steps=preset.steps, name=name)
