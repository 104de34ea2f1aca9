"""Binary-coding quantization (BCQ) of LUT-GEMM (Park et al., 2022): numerics and the weight.

A weight row is split into groups of ``g`` input columns; each group is written as

    w ~ sum_{i=0..q-1} alpha_i * b_i + z,    b_i in {-1, +1}

with ``q`` alphas and one offset ``z`` per (row, group) ("biased BCQ", which writes any uniform
q-bit grid exactly, see :func:`uniform_to_bcq`). In memory a weight's ``q`` binary codes are one
unsigned code per weight, ``c = sum_i 2^i * (b_i + 1) / 2``: bit ``i`` of ``c`` is plane ``i``.

Fitting (:func:`fit_bcq`) follows the paper: a greedy start (``z`` the group's mean, then
``alpha = mean|r|``, ``b = sign(r)`` on the residual ``r``, largest plane first), then rounds of
alternating least squares: the alphas and ``z`` given the codes (one small least-squares problem
per row and group), then the best code of each weight given the alphas (all ``2^q`` patterns
tried). Optionally weighted per input column (the activation-aware variant: the input second
moments ``diag(H)``), which changes the least-squares step, not the best code of a weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.packing import pack_bits, packed_nbytes, unpack_bits
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec

MAX_BITS = 4  # the paper's 1..4 bits; 2^q candidates per weight in the code step
INITS = ("greedy", "uniform", "best")


@dataclass
class BCQWeight:
    """A linear layer's weight (out, in) as BCQ binary codes.

    - ``codes``: (out, in) uint8, bit ``i`` of each code is plane ``i`` (``b_i = 2 * bit - 1``);
    - ``alpha``: (out, G, q) float16, the scale of each plane per row and group;
    - ``offset``: (out, G) float16, ``z`` per row and group;
    - ``group_size``: ``g`` input columns per group (``in = G * g``);
    - ``spec``: the scheme's weight spec this weight was made for (its bits and group size).
    """

    codes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor
    group_size: int
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    @property
    def bits(self) -> int:
        return int(self.alpha.shape[-1])

    def to(self, device: torch.device | str) -> BCQWeight:
        """The same weight with its tensors on ``device``."""
        return dataclasses.replace(
            self, codes=self.codes.to(device), alpha=self.alpha.to(device), offset=self.offset.to(device)
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight in ``dtype`` (float32 by default)."""
        return bcq_reconstruct(self.codes, self.alpha.to(dtype), self.offset.to(dtype), self.group_size)

    def bits_per_weight(self) -> float:
        """``q`` code bits plus ``q`` alphas and one offset per group, each 16 bits."""
        out, inp = self.shape
        extra = (self.alpha.numel() + self.offset.numel()) * 16
        return self.bits + extra / (out * inp)

    def describe(self) -> str:
        return f"BCQ {self.bits}-bit binary codes, groups of {self.group_size}, fp16 alphas and offset"


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise LowbitError(f"BCQ takes 1 to {MAX_BITS} bits (the paper's range), got {bits!r}")


def check_group(inp: int, group_size: int) -> None:
    if group_size < 1 or inp % group_size:
        raise LowbitError(
            f"BCQ groups of {group_size} do not divide the input width {inp}; choose a group size that divides it "
            "(or per-channel weights)"
        )


def code_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (...) -> their binary planes (..., bits) in {-1, +1} (int8); plane ``i`` is bit ``i``."""
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    return ((codes.to(torch.uint8)[..., None] >> shifts) & 1).to(torch.int8) * 2 - 1


def code_values(alpha: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The value of every code per row and group: alpha (..., q), offset (...) -> (..., 2^q).

    ``values[..., c] = sum_i alpha_i * b_i(c) + z``, summed over planes in order 0..q-1 and the
    offset added last (the one order every reconstruction here uses).
    """
    bits = alpha.shape[-1]
    signs = code_planes(torch.arange(2**bits, device=alpha.device), bits).to(alpha.dtype)  # (2^q, q)
    acc = torch.zeros((*alpha.shape[:-1], 2**bits), dtype=alpha.dtype, device=alpha.device)
    for i in range(bits):
        acc = acc + alpha[..., i : i + 1] * signs[:, i]
    return acc + offset[..., None]


def bcq_reconstruct(codes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (out, in), alpha (out, G, q), offset (out, G) -> weight (out, in) in alpha's dtype."""
    out, inp = codes.shape
    values = code_values(alpha, offset)  # (out, G, 2^q)
    grouped = codes.reshape(out, -1, group_size).to(torch.int64)
    return torch.gather(values, 2, grouped).reshape(out, inp)


def uniform_to_bcq(scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniform grid ``s * c + m`` (``c`` in 0..2^q-1) as biased BCQ with the same codes ``c``.

    scale, minimum (...) -> alpha (..., q), offset (...): ``alpha_i = s * 2^(i-1)`` and
    ``z = m + s * (2^q - 1) / 2``, since ``c = sum_i 2^i (b_i + 1) / 2``.
    """
    check_bits(bits)
    powers = torch.tensor([2.0 ** (i - 1) for i in range(bits)], dtype=scale.dtype, device=scale.device)
    return scale[..., None] * powers, minimum + scale * ((2**bits - 1) / 2)


@dataclass
class BCQFit:
    """What :func:`fit_bcq` found: codes (out, in) uint8, alpha (out, G, q) and offset (out, G) in
    float32, and the (weighted) squared error after the start and after each round (float64 sums)."""

    codes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor
    errors: list[float]


def _row_errors(
    w: torch.Tensor, d: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """Per (row, group) weighted squared error; w, d (R, g), codes (R, g), alpha (R, q), z (R,) -> (R,) float64."""
    recon = torch.gather(code_values(alpha, z), 1, codes.to(torch.int64))
    return ((w - recon).pow(2) * d).to(torch.float64).sum(1)


def greedy_init(w: torch.Tensor, d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's greedy start on rows of one group each: w, d (R, g) -> codes (R, g), alpha (R, q), z (R,).

    ``z`` is the (weighted) mean; then from the largest plane down, ``alpha = sum(d |r|) / sum(d)``
    and ``b = sign(r)`` (``+1`` for 0) on the residual ``r``, which is then reduced by ``alpha * b``.
    """
    dsum = d.sum(1).clamp_min(torch.finfo(d.dtype).tiny)
    z = (w * d).sum(1) / dsum
    r = w - z[:, None]
    alpha = torch.zeros(w.shape[0], bits, dtype=w.dtype, device=w.device)
    codes = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    for i in reversed(range(bits)):
        a = (r.abs() * d).sum(1) / dsum
        pos = r >= 0
        b = pos.to(w.dtype) * 2 - 1
        alpha[:, i] = a
        codes |= pos.to(torch.int64) << i
        r = r - a[:, None] * b
    return codes, alpha, z


def best_codes(
    w: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor, current: torch.Tensor | None = None
) -> torch.Tensor:
    """The code of each weight whose value is nearest: w (R, g), alpha (R, q), z (R,) -> (R, g) int64.

    Every one of the ``2^q`` patterns is a candidate: the values are sorted and each weight's
    nearest one is found by bisection on the midpoints. With ``current`` (R, g), a weight keeps its
    code where the new one is not strictly nearer (a midpoint rounded in float can misplace a
    weight that lies on it), so the error never rises. A positive per-column weight in the error
    does not change a weight's best code.
    """
    values = code_values(alpha, z)  # (R, 2^q)
    ordered, order = values.sort(dim=1)
    mids = (ordered[:, 1:] + ordered[:, :-1]) / 2  # (R, 2^q - 1)
    rank = torch.searchsorted(mids.contiguous(), w.contiguous())  # (R, g): the midpoints below each weight
    codes = torch.gather(order, 1, rank)
    if current is not None:
        current = current.to(torch.int64)
        new_dist = (w - torch.gather(values, 1, codes)).abs()
        old_dist = (w - torch.gather(values, 1, current)).abs()
        codes = torch.where(new_dist < old_dist, codes, current)
    return codes


def least_squares(
    w: torch.Tensor, d: torch.Tensor, codes: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The alphas and offset minimising ``sum d (w - sum alpha_i b_i - z)^2`` given the codes.

    w, d (R, g), codes (R, g) -> alpha (R, q), z (R,) in w's dtype. The normal equations
    ``A^T D A theta = A^T D w`` (A = [b_0 .. b_{q-1}, 1]) are built in float64 from each code's
    sums and solved in float64; a singular group (a plane constant over the group, two equal
    planes) is solved with the pseudo-inverse, which still gives a least-squares minimiser.
    """
    # the system only depends on each code's total weight and weighted sum of w: one pass over
    # the weights, then (R, 2^q) x (2^q, .) products
    n_codes = 2**bits
    idx = codes.to(torch.int64)
    count = torch.zeros(w.shape[0], n_codes, dtype=torch.float64, device=w.device)
    total = torch.zeros_like(count)
    count.scatter_add_(1, idx, d.to(torch.float64))
    total.scatter_add_(1, idx, (d * w).to(torch.float64))
    signs = code_planes(torch.arange(n_codes, device=w.device), bits).to(torch.float64)  # (2^q, q)
    a = torch.cat([signs, torch.ones(n_codes, 1, dtype=torch.float64, device=w.device)], dim=1)  # (2^q, q+1)
    outer = (a[:, :, None] * a[:, None, :]).reshape(n_codes, -1)  # (2^q, (q+1)^2)
    m = (count @ outer).reshape(-1, bits + 1, bits + 1)
    v = (total @ a)[..., None]  # (R, q+1, 1)
    theta, info = torch.linalg.solve_ex(m, v)
    bad = (info != 0) | ~torch.isfinite(theta).all(dim=(1, 2))
    if bool(bad.any()):  # singular groups: the pseudo-inverse gives a least-squares minimiser
        theta[bad] = torch.linalg.pinv(m[bad], hermitian=True) @ v[bad]
    theta = theta[..., 0]
    return theta[:, :bits].to(w.dtype), theta[:, bits].to(w.dtype)


def uniform_init(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A start on the uniform grid RTN would use (asymmetric, MSE-clipped ranges as the presets'
    ``w{b}a16``), written exactly as BCQ: w (out, in) -> codes (R, g), alpha (R, q), z (R,)."""
    if bits < 2:
        raise LowbitError("the uniform start needs 2 to 4 bits (there is no 1-bit grid); use init 'greedy'")
    mse = {"maxshrink": 0.2}
    spec = QuantSpec(
        f"uint{bits}", "group", group_size, False, scale_dtype="float16", observer="mse", observer_args=mse
    )
    qw = quantize_weight(w, spec)
    scale = qw.scale.to(w.dtype).reshape(-1)
    alpha, z = uniform_to_bcq(scale, -scale * qw.zero_point.to(w.dtype).reshape(-1), bits)
    return _grouped(qw.codes.to(torch.int64), group_size), alpha, z


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(out, inp // group_size, group_size).reshape(-1, group_size)


def fit_bcq(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    rounds: int = 10,
    col_weight: torch.Tensor | None = None,
    init: str = "greedy",
) -> BCQFit:
    """Fit biased BCQ to ``w`` (out, in): greedy start, then ``rounds`` of alternating least squares.

    ``col_weight`` (in,): optional non-negative weight of each input column in the error (the
    activation-aware variant passes ``diag(H)``). Each round's least-squares step is kept for a
    (row, group) only where it does not raise that group's error (the pseudo-inverse of an
    ill-conditioned system can, by rounding), and the code step never does, so ``errors`` never
    increases. ``init``: ``greedy`` (the paper's start), ``uniform`` (the MSE-clipped uniform
    grid, :func:`uniform_init`: the rounds can then only lower RTN's error) or ``best`` (per row
    and group the start with the lower error).
    """
    check_bits(bits)
    if init not in INITS:
        raise LowbitError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if w.dim() != 2:
        raise LowbitError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    out, inp = w.shape
    check_group(inp, group_size)
    if rounds < 0:
        raise LowbitError(f"rounds must be >= 0, got {rounds}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise LowbitError("the weight contains NaN or inf; the model file is damaged or was trained unstably")
    if col_weight is None:
        cw = torch.ones(inp, device=w.device)
    else:
        cw = col_weight.detach().to(torch.float32).flatten()
        if cw.numel() != inp or not torch.isfinite(cw).all() or bool((cw < 0).any()):
            raise LowbitError(f"col_weight must be {inp} finite non-negative numbers (one per input column)")
    wg = _grouped(w, group_size)
    d = cw.reshape(1, -1, group_size).expand(out, -1, -1).reshape(-1, group_size).contiguous()
    if init == "uniform":
        codes, alpha, z = uniform_init(w, bits, group_size)
    else:
        codes, alpha, z = greedy_init(wg, d, bits)
    err = _row_errors(wg, d, codes, alpha, z)
    if init == "best":  # per (row, group) the better of the two starts
        u_codes, u_alpha, u_z = uniform_init(w, bits, group_size)
        u_err = _row_errors(wg, d, u_codes, u_alpha, u_z)
        take = u_err < err
        codes = torch.where(take[:, None], u_codes, codes)
        alpha, z, err = torch.where(take[:, None], u_alpha, alpha), torch.where(take, u_z, z), torch.minimum(u_err, err)
    errors = [float(err.sum())]
    for _ in range(rounds):
        new_alpha, new_z = least_squares(wg, d, codes, bits)
        new_err = _row_errors(wg, d, codes, new_alpha, new_z)
        better = new_err <= err
        alpha = torch.where(better[:, None], new_alpha, alpha)
        z = torch.where(better, new_z, z)
        codes = best_codes(wg, alpha, z, current=codes)
        err = _row_errors(wg, d, codes, alpha, z)
        errors.append(float(err.sum()))
    groups = inp // group_size
    return BCQFit(
        codes=codes.to(torch.uint8).reshape(out, inp),
        alpha=alpha.reshape(out, groups, bits),
        offset=z.reshape(out, groups),
        errors=errors,
    )


def bcq_weight(fit: BCQFit, w: torch.Tensor, spec: QuantSpec, group_size: int) -> BCQWeight:
    """The stored weight of a fit: alphas and offset rounded to float16, then every weight given
    the best code for the rounded values (the code step once more, so the file's numbers are the
    ones the codes were chosen for)."""
    alpha16, z16 = fit.alpha.to(torch.float16), fit.offset.to(torch.float16)
    out, inp = w.shape
    codes = best_codes(
        _grouped(w.detach().to(torch.float32), group_size),
        alpha16.float().reshape(-1, fit.alpha.shape[-1]),
        z16.float().reshape(-1),
    )
    return BCQWeight(
        codes=codes.to(torch.uint8).reshape(out, inp), alpha=alpha16, offset=z16, group_size=group_size, spec=spec
    )


def bcq_group_size(spec: QuantSpec, inp: int) -> int:
    """The BCQ group of a weight spec: its ``group_size`` for groups, the whole row per channel."""
    if spec.granularity == "channel":
        return inp
    if spec.granularity != "group" or spec.group_size is None:
        raise LowbitError(f"BCQ weights are per group or per channel, not {spec.granularity!r}")
    return spec.group_size


def bcq_tensors(name: str, w: BCQWeight) -> dict[str, torch.Tensor]:
    """A BCQ weight as checkpoint tensors: codes packed ``q`` bits each (LSB first), alphas and offset."""
    return {
        f"{name}.weight_bcq_packed": pack_bits(w.codes.to(torch.int16), w.bits),
        f"{name}.weight_bcq_alpha": w.alpha.contiguous(),
        f"{name}.weight_bcq_offset": w.offset.contiguous(),
    }


def load_bcq(name: str, shape: list[int], spec: QuantSpec, t: dict[str, torch.Tensor]) -> BCQWeight:
    """Inverse of :func:`bcq_tensors` (popping them from ``t``), with every shape checked."""
    out, inp = shape
    packed = t.pop(f"{name}.weight_bcq_packed")
    alpha, offset = t.pop(f"{name}.weight_bcq_alpha"), t.pop(f"{name}.weight_bcq_offset")
    bits = int(alpha.shape[-1]) if alpha.dim() == 3 else 0
    group = bcq_group_size(spec, inp)
    groups = inp // group if group and inp % group == 0 else -1
    if (
        bits not in range(1, MAX_BITS + 1)
        or tuple(alpha.shape) != (out, groups, bits)
        or tuple(offset.shape) != (out, groups)
        or packed.numel() != packed_nbytes(out * inp, bits)
    ):
        raise LowbitError(
            f"{name}: BCQ tensors (codes {packed.numel()} bytes, alpha {tuple(alpha.shape)}, offset "
            f"{tuple(offset.shape)}) do not fit a {out}x{inp} weight in groups of {group}; the checkpoint is damaged"
        )
    codes = unpack_bits(packed, bits, out * inp).reshape(out, inp).to(torch.uint8)
    return BCQWeight(codes=codes, alpha=alpha, offset=offset, group_size=group, spec=spec)
