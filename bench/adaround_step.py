"""One AdaRound training step on a SmolLM2-135M-shaped llama block: the autograd reference
against lowbit's few-pass soft weight (``lowbit.algorithms.softround``) and fused Adam.

    python bench/adaround_step.py [--steps 20] [--tokens 512] [--precision auto|bf16|fp32]

Both paths train the same rounding variables (int4, groups of 64, RTN start) on the same
sequence of ``tokens`` random hidden states against the float block's output, with the
regulariser on (beta 10), and print the milliseconds per step, their ratio, the time of the
block's forward and backward alone (frozen weights), the same with its weights' gradients (the
matmuls a rounding step needs: what a step cannot go below), and the
largest difference between the two paths' losses over the steps (the same math: rounding-level
differences only). Random weights: a step's time does not depend on their values.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lowbit.algorithms.reconstruction import StudentLayer, autocast, block_loss, student
from lowbit.algorithms.rounding import adaround_weight, rectified_sigmoid, rounding_regularizer
from lowbit.algorithms.softround import SoftRounding, adam
from lowbit.pipeline import resolve_device
from lowbit.qweight import quantize_weight
from lowbit.scheme import QuantSpec

LAM, BETA = 0.01, 10.0


class ReferenceRounding(SoftRounding):
    """The plain autograd formulation: ``s * (clip(b + h(V)) - z)`` and the regulariser's graph."""

    def weight(self) -> torch.Tensor:
        return adaround_weight(self.base, rectified_sigmoid(self.v), self.s, self.z, self.qmin, self.qmax)

    def add_regularizer_grad(self, lam: float, beta: float) -> None:
        (lam * rounding_regularizer(rectified_sigmoid(self.v), beta)).backward()


def block_and_inputs(tokens: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, dict, torch.Tensor]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64
    )
    cfg._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(cfg, 0).float().eval().to(device)
    for p in block.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, tokens, 576).to(device)
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    kwargs = {"position_embeddings": rotary(x, torch.arange(tokens, device=device)[None]), "attention_mask": None}
    with torch.no_grad():
        out = block(x, **kwargs)
    return block, x, kwargs, out[0] if isinstance(out, tuple) else out


def run(
    kind: type[SoftRounding], steps: int, tokens: int, precision: str, device: torch.device
) -> tuple[float, list[float]]:
    block, x, kwargs, target = block_and_inputs(tokens, device)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = QuantSpec("int4", "group", 64, symmetric=True)
    rounders = {n: kind(m.weight.float(), quantize_weight(m.weight, spec)) for n, m in linears.items()}
    layers = {n: StudentLayer(m, rounders[n].weight, None) for n, m in linears.items()}
    optimizer = adam(list(rounders.values()), 0.1) if kind is SoftRounding else None
    if optimizer is None:  # the reference: torch's default Adam (foreach)
        optimizer = torch.optim.Adam([r.v for r in rounders.values()], lr=0.1)
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with student(block, layers), torch.enable_grad():
            with autocast(x.device, precision):
                out = block(x, **kwargs)
            loss = block_loss(out, target)
            loss.backward()
        for r in rounders.values():
            r.add_regularizer_grad(LAM, BETA)
        optimizer.step()
        losses.append(loss.detach())

    seconds = timed(step, steps, device)
    return seconds, [float(t) for t in losses]


def frozen_pass(tokens: int, precision: str, steps: int, device: torch.device, weight_grads: bool = False) -> float:
    """The block's forward and backward to its input (frozen weights), or with ``weight_grads``
    also to its plain weights: the matmuls a rounding step needs, without any rounding work."""
    block, x, kwargs, target = block_and_inputs(tokens, device)
    x = x.clone().requires_grad_(not weight_grads)  # a rounding step needs no input gradient
    for m in block.modules():
        if weight_grads and isinstance(m, torch.nn.Linear):
            m.weight.requires_grad_(True)

    def step() -> None:
        with torch.enable_grad(), autocast(x.device, precision):
            out = block(x, **kwargs)
        block_loss(out, target).backward()
        for p in block.parameters():
            p.grad = None

    return timed(step, steps, device)


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    device = resolve_device(args.device)
    ref_s, ref_losses = run(ReferenceRounding, args.steps, args.tokens, args.precision, device)
    new_s, new_losses = run(SoftRounding, args.steps, args.tokens, args.precision, device)
    floor_s = frozen_pass(args.tokens, args.precision, args.steps, device)
    grads_s = frozen_pass(args.tokens, args.precision, args.steps, device, weight_grads=True)
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref_losses, new_losses, strict=True))
    setting = f"1 x {args.tokens} tokens, {args.precision}, {args.steps} steps"
    print(f"{device}, threads {torch.get_num_threads()}, {setting}")
    print(f"autograd reference     {1e3 * ref_s:8.1f} ms/step")
    print(f"lowbit (few-pass)      {1e3 * new_s:8.1f} ms/step   reference / lowbit {ref_s / new_s:.2f}x")
    print(f"block fwd+bwd, frozen  {1e3 * floor_s:8.1f} ms/step   lowbit / frozen {new_s / floor_s:.2f}x")
    print(f"block fwd+bwd, weights {1e3 * grads_s:8.1f} ms/step   lowbit / this {new_s / grads_s:.2f}x")
    print(f"largest relative loss difference over the steps: {diff:.2e}")


if __name__ == "__main__":
    main()
