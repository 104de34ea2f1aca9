"""Fast CPU inference: lowbit's quantized layers on torch's low-bit matmul kernels.

``QuantLinear`` multiplies by its dequantized float32 weight: exact, but it reads 4 bytes per
weight. :func:`use_kernels` swaps the layers whose grid a kernel holds exactly for modules that
keep the codes packed and call torch's CPU kernels:

- :class:`Int4Linear`: integer grids of at most 4 bits (int4/uint4, also int2/int3; symmetric
  or with zero points), in groups (32, 64, 128, 256 or multiples), per channel or per tensor,
  through ``_weight_int4pack_mm_for_cpu`` (4-bit codes + a bf16 scale and offset per group).
  Act-order ``g_idx`` groups are handled by permuting the input features; OWQ's float columns
  by a small float matmul on those inputs.
- :class:`Int8Linear`: integer grids of 5..8 bits with one scale per output channel (or per
  tensor) whose codes minus zero point fit int8, and input widths that are multiples of 16,
  through ``_weight_int8pack_mm``.

Two guards keep a kernel from being trusted blindly. Known limits are checked from the shape
(:func:`int8_refusal`): torch 2.13's ``_weight_int8pack_mm`` with bfloat16 activations on an
AVX-512 CPU walks the input dimension 16 values at a time with no tail, so for K not a multiple
of 16 it reads past the rows of its operands: a segmentation fault, or silently wrong outputs
when the memory after them happens to be mapped (probed with the operands placed right before
an unreadable page; float16 and float32 activations and K multiples of 16 were right). And
:func:`use_kernels` runs every new kernel layer once per distinct shape on a small input and
compares it with the layer's float reference before using it (:func:`kernel_mismatch`); a layer
whose kernel disagrees stays on the reference path and the report says why.

The kernels are fast only with bfloat16 activations (float32 ones take a slow path; float16
works but was 8x slower than bfloat16 on a 2-core AVX2 machine), so by default the whole model
runs in bfloat16: norms, attention, embeddings and lm_head too, which decoded fastest at batch 1
(see :func:`use_kernels` for the alternative). This changes the numerics from lowbit's
float32 reference: activations are rounded to bf16 and the group scales/offsets are stored in
bf16. The weight grid itself is the same. Layers no kernel takes (quantized activations,
float formats, group sizes below 32, ...) stay ``QuantLinear`` in float32, run between casts,
and the report names them with the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat
from lowbit.modules import QuantLinear
from lowbit.qweight import QuantizedWeight

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu takes, preferred first
INT4_N_ALIGN = 16  # the int4 packing takes output features in multiples of 16
INT4_ZERO_CODE = 8  # the kernel computes (code - 8) * scale + offset
# _weight_int8pack_mm's bfloat16 path (AVX-512) reads K in steps of 16 with no tail: other K read
# past the operands (segfault or wrong values), see the module docstring
INT8_K_ALIGN = 16
# the self-check before a kernel layer is used: rows of the probe input (odd, so the kernels' row
# blocks of 4 have a tail) and how far its output may be from the float reference, relative to the
# largest reference value (the kernel rounds inputs, scales and outputs to bf16: about 2**-8 each)
PROBE_ROWS = 5
PROBE_RTOL = 2**-5
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# float buffers that stay float32 when the model is cast: rotary frequencies (HF computes cos/sin
# in float32 from them and casts the result)
KEEP_FLOAT32_BUFFERS = ("inv_freq", "original_inv_freq")
_OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm")


def kernels_available() -> bool:
    """Whether this torch build has the CPU int4/int8 weight-only kernels."""
    return all(hasattr(torch.ops.aten, op) for op in _OPS)


class _KernelLinear(nn.Module, ABC):
    """What both kernel layers share: the cast to the kernel's dtype, OWQ's float columns (their
    inputs are zeroed before the kernel, whose codes there are unused, and go through a small float
    matmul instead), the bias and the cast back. Subclasses supply ``_matmul`` on a 2-D input.

    Lean on purpose: this runs once per layer and token, where a few microseconds add up."""

    in_features: int
    out_features: int
    run_dtype: torch.dtype
    outlier_idx: torch.Tensor | None
    outlier_weight: torch.Tensor | None
    bias: torch.Tensor | None

    @abstractmethod
    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(rows, in_features) in ``run_dtype`` -> (rows, out_features) through the kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.run_dtype:
            x2 = x2.to(self.run_dtype)
        extra = None
        if self.outlier_idx is not None:
            x2, extra = self._split(x2)
        y = self._matmul(x2)
        if extra is not None:
            y = y + extra
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _set_outliers(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        keep = qw.outlier_idx is not None and qw.outlier_weight is not None and qw.n_outlier_columns > 0
        self.register_buffer("outlier_idx", qw.outlier_idx.to(torch.int64) if keep else None)  # type: ignore[union-attr]
        self.register_buffer("outlier_weight", qw.outlier_weight.to(dtype) if keep else None)  # type: ignore[union-attr]

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.outlier_idx is None or self.outlier_weight is None:
            return x, None
        extra = F.linear(x.index_select(1, self.outlier_idx), self.outlier_weight)
        return x.index_fill(1, self.outlier_idx, 0.0), extra


class Int4Linear(_KernelLinear):
    """A linear layer whose weight is 4-bit codes packed for ``_weight_int4pack_mm_for_cpu``.

    Weight ``w[n, k] = (code[n, k] - 8) * scale[k // group, n] + offset[k // group, n]`` over the
    kernel's groups; ``perm`` (act-order) reorders the input features so that lowbit's groups are
    contiguous, ``k_pad`` zero input features fill the last group, ``n_pad`` zero rows fill the
    output to a multiple of 16.
    """

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    perm: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_dtype(dtype)
        plan = int4_plan(qw)
        if isinstance(plan, str):
            raise LowbitError(f"the int4 kernel cannot take this weight: {plan}")
        group, perm = plan
        out, inp = qw.shape
        self.out_features, self.in_features, self.group = out, inp, group
        self.k_pad = -inp % group
        self.n_pad = -out % INT4_N_ALIGN
        codes, scale, offset = int4_codes(qw, perm)  # (out, in) codes in 0..15 (columns in `perm` order)
        codes = F.pad(codes.to(torch.int32), (0, self.k_pad, 0, self.n_pad), value=INT4_ZERO_CODE)
        # one scale and offset per kernel group (a divisor of lowbit's group), padded rows zero
        cols = torch.arange(0, inp + self.k_pad, group).clamp(max=inp - 1)
        scale, offset = F.pad(scale[:, cols], (0, 0, 0, self.n_pad)), F.pad(offset[:, cols], (0, 0, 0, self.n_pad))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1))
        self.register_buffer("scales_zeros", torch.stack([scale.t(), offset.t()], -1).to(dtype).contiguous())
        self.register_buffer("perm", perm)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self._set_outliers(qw, dtype)
        self.run_dtype = dtype

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.k_pad:
            x2 = F.pad(x2, (0, self.k_pad))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group, self.scales_zeros)
        return y[:, : self.out_features] if self.n_pad else y

    def extra_repr(self) -> str:
        perm = ", act-order" if self.perm is not None else ""
        return f"in={self.in_features}, out={self.out_features}, int4 kernel group={self.group}{perm}"


class Int8Linear(_KernelLinear):
    """A linear layer whose weight is int8 codes with one scale per output channel, for
    ``_weight_int8pack_mm``: ``w[n, k] = code[n, k] * scale[n]``."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        _check_dtype(dtype)
        why = int8_refusal(qw)
        if why:
            raise LowbitError(f"the int8 kernel cannot take this weight: {why}")
        out, inp = qw.shape
        self.out_features, self.in_features = out, inp
        scale = qw.scale.to(torch.float32).expand(out, 1)[:, 0]
        zp = qw.zero_point.to(torch.float32).expand(out, 1)
        self.register_buffer("weight", (qw.grid_values() - zp).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self._set_outliers(qw, dtype)
        self.run_dtype = dtype

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 kernel per channel"


class KeptLinear(nn.Module):
    """A layer no kernel takes, run as it was (in its own dtype, float32) between casts."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.run_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.run_dtype)).to(x.dtype)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        raise LowbitError(f"the CPU kernels need {names} activations, got {dtype}; float32 would be far slower")


def _int_format(qw: QuantizedWeight) -> IntFormat | str:
    fmt = qw.spec.fmt
    if not isinstance(fmt, IntFormat):
        return f"{qw.spec.format} is a float format; the kernels take integer grids"
    return fmt


def int4_plan(qw: QuantizedWeight) -> tuple[int, torch.Tensor | None] | str:
    """(kernel group size, input permutation or None) for the int4 kernel, or why it cannot."""
    fmt = _int_format(qw)
    if isinstance(fmt, str):
        return fmt
    if fmt.bits > 4:
        return f"{fmt.bits}-bit codes do not fit the int4 kernel"
    inp = qw.shape[1]
    spec = qw.spec
    if spec.granularity != "group":  # one scale per row (or tensor): any kernel group works
        fitting = [g for g in INT4_GROUPS if inp % g == 0]
        return (fitting[0] if fitting else INT4_GROUPS[-1]), None
    gs = spec.group_size or inp
    candidates = [g for g in INT4_GROUPS if gs % g == 0]
    if not candidates:
        return f"groups of {gs}: the int4 kernel takes groups of {', '.join(map(str, INT4_GROUPS))} or multiples"
    g_idx = qw.g_idx.to(torch.int64)
    plain = torch.arange(inp) // gs
    perm = None
    if not torch.equal(g_idx, plain):
        perm = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[perm], plain):
            return "its g_idx groups are not all of the group size, so no input order makes them contiguous"
    # prefer a group that needs no padding of the input features
    fitting = [g for g in candidates if inp % g == 0]
    return (fitting[0] if fitting else candidates[0]), perm


def int4_codes(qw: QuantizedWeight, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (out, in) in 0..15 with columns in ``perm`` order, and per-column (out, in) scale and
    offset such that ``(code - 8) * scale + offset`` is lowbit's ``scale * (q - zero_point)``."""
    fmt = qw.spec.fmt
    assert isinstance(fmt, IntFormat)
    shift = INT4_ZERO_CODE if fmt.signed else 0  # signed grids are moved up to 0..15
    g_idx = qw.g_idx if perm is None else qw.g_idx[perm]
    out = qw.shape[0]
    # (out, G), (out, 1) or (1, 1) -> one value per (row, column)
    scale = qw.scale.to(torch.float32).expand(out, -1)[:, g_idx]
    zp = qw.zero_point.to(torch.float32).expand(out, -1)[:, g_idx]
    q = qw.grid_values()
    if perm is not None:
        q = q[:, perm]
    codes = (q + shift).to(torch.int32)
    offset = scale * (INT4_ZERO_CODE - shift - zp)
    return codes, scale, offset


def int8_refusal(qw: QuantizedWeight) -> str:
    """Why the int8 kernel cannot take ``qw`` ('' when it can)."""
    fmt = _int_format(qw)
    if isinstance(fmt, str):
        return fmt
    if qw.spec.granularity == "group":
        return f"groups of {qw.spec.group_size}: the int8 kernel takes one scale per output channel"
    if qw.shape[1] % INT8_K_ALIGN:
        return (
            f"{qw.shape[1]} input features are not a multiple of {INT8_K_ALIGN}: torch's int8 kernel reads "
            "past such rows (a crash or wrong values)"
        )
    zp = qw.zero_point.to(torch.float32).expand(qw.shape[0], 1)
    c = qw.grid_values() - zp
    if c.numel() and (float(c.min()) < -128 or float(c.max()) > 127):
        return "codes minus zero point fall outside int8 (an asymmetric 8-bit grid); the int8 kernel is symmetric"
    return ""


def probe_input(in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """A fixed (PROBE_ROWS, in_features) input in ``dtype`` for the kernel self-check."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(PROBE_ROWS, in_features, generator=g).to(dtype)


@torch.no_grad()
def kernel_mismatch(layer: nn.Module, reference: QuantLinear, dtype: torch.dtype) -> str:
    """Why ``layer`` cannot stand in for ``reference`` on a probe input ('' when it matches): it
    raised, gave a wrong shape or non-finite values, or is further than PROBE_RTOL (relative to the
    largest output) from the float64 product with the reference's dequantized weight."""
    x = probe_input(reference.in_features, dtype)
    try:
        y = layer(x)
    except RuntimeError as e:
        return f"the kernel failed on a probe input: {str(e).splitlines()[0]}"
    ref = F.linear(x.double(), reference.weight.double(), None if reference.bias is None else reference.bias.double())
    if y.shape != ref.shape:
        return f"the kernel gave shape {tuple(y.shape)} for {tuple(ref.shape)} on a probe input"
    err, scale = float((y.double() - ref).abs().max()), float(ref.abs().max())
    if not err <= PROBE_RTOL * scale + 1e-6:  # also catches NaN
        return f"the kernel's output on a probe input is {err:.3g} from the reference (largest value {scale:.3g})"
    return ""


def kernel_plan(module: QuantLinear) -> tuple[str, str]:
    """("int4" | "int8" | "kept", reason) for one QuantLinear."""
    qw = module.qweight
    if module.bcq is not None:
        return "kept", "BCQ binary codes: no torch kernel; lowbit.lutgemm.use_lutgemm runs LUT-GEMM's reference"
    if qw is None:
        return "kept", "float weight (only its activations are quantized)"
    if module.act is not None:
        return "kept", f"input activations are quantized ({module.act.spec.describe()}); the kernels take float inputs"
    if qw.spec.encoding is not None or qw.lorc_u is not None:
        return "kept", "Olive pair codes or LoRC factors: the kernels hold plain grids only"
    plan = int4_plan(qw)
    if not isinstance(plan, str):
        return "int4", ""
    why8 = int8_refusal(qw)
    if not why8:
        return "int8", ""
    return "kept", why8 if qw.spec.fmt.bits > 4 else plan


def kernel_layer_count(model: nn.Module) -> int:
    """How many of ``model``'s layers a kernel would take."""
    return sum(isinstance(m, QuantLinear) and kernel_plan(m)[0] != "kept" for m in model.modules())


@dataclass
class KernelReport:
    """What :func:`use_kernels` did: which layers run on which kernel, which were kept and why."""

    dtype: torch.dtype
    int4: list[str] = field(default_factory=list)
    int8: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # layer -> reason
    float_linears: list[str] = field(default_factory=list)  # unquantized nn.Linear cast to `dtype`

    def lines(self) -> list[str]:
        dt = str(self.dtype).removeprefix("torch.")
        out = [
            f"kernels: {len(self.int4)} int4 layers, {len(self.int8)} int8 layers, {len(self.kept)} kept as "
            f"QuantLinear, {len(self.float_linears)} float linears cast to {dt}; kernel activations in {dt}"
        ]
        reasons: dict[str, list[str]] = {}
        for name, why in self.kept.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            out.append(f"  kept {shown}: {why}")
        return out


def use_kernels(model: nn.Module, dtype: torch.dtype = torch.bfloat16, cast_rest: bool = True) -> KernelReport:
    """Swap ``model``'s QuantLinear layers for kernel modules in place and cast the rest to ``dtype``.

    Layers the kernels cannot take stay QuantLinear in float32 (wrapped in :class:`KeptLinear`,
    which casts around them); the report lists them with the reason. ``cast_rest=False`` leaves
    everything else (norms, attention, embeddings, lm_head) in its dtype and casts at each kernel
    layer instead: on a 2-core AVX2 machine that decoded the demo model 15% slower at batch 1
    but 30% faster at batch 8, where bfloat16 attention and lm_head (no native bf16 arithmetic)
    cost more than float32's.
    """
    _check_dtype(dtype)
    if not kernels_available():
        raise LowbitError(f"this torch ({torch.__version__}) lacks the CPU int4/int8 kernels; run without kernels")
    if any(t.device.type != "cpu" for t in model.parameters()):
        raise LowbitError("the kernels run on CPU; move the model to CPU first")
    report = KernelReport(dtype)
    frozen: list[str] = []  # modules whose tensors keep their dtype
    checked: dict[tuple[str, int, int, bool], str] = {}  # (kind, out, in, bias) -> mismatch, one probe each
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            kind, why = kernel_plan(module)
            new: nn.Module | None = None
            if kind != "kept" and module.qweight is not None:
                layer = (Int4Linear if kind == "int4" else Int8Linear)(module.qweight, module.bias, dtype)
                key = (kind, module.out_features, module.in_features, module.bias is not None)
                if key not in checked:
                    checked[key] = kernel_mismatch(layer, module, dtype)
                why = checked[key]
                if not why:
                    new = layer
                    (report.int4 if kind == "int4" else report.int8).append(name)
            if new is None:
                new = KeptLinear(module, module.weight.dtype)
                report.kept[name] = why
            model.set_submodule(name, new)
            frozen.append(name)
        elif isinstance(module, nn.Linear):
            report.float_linears.append(name)
    if cast_rest:
        _cast_rest(model, dtype, tuple(frozen))
    else:
        report.float_linears = []  # they keep their dtype
    return report


def _cast_rest(model: nn.Module, dtype: torch.dtype, frozen: tuple[str, ...]) -> None:
    """Cast float parameters and buffers outside ``frozen`` modules to ``dtype`` (tied parameters
    stay tied: the Parameter object is kept and its data replaced)."""
    for name, module in model.named_modules():
        if any(name == f or name.startswith(f + ".") for f in frozen):
            continue
        for p in module._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and key not in KEEP_FLOAT32_BUFFERS:
                module._buffers[key] = b.to(dtype)
