"""Channel reordering folded into a decoder block, exactly (RPTQ, Yuan et al. 2023).

A permutation ``perm`` of an activation's channels (new channel ``j`` is old channel
``perm[j]``) is folded into the ops on both sides of it, so the block computes the same
function and the quantizer sees the channels of each cluster side by side:

- after a norm (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up): the norm
  reads the residual stream, which must stay in its own order (every block and the head read
  it), so the permutation cannot go into the norm's input. RPTQ fuses it into the LayerNorm
  kernel, which writes its output channels in the new order. Here that is
  :class:`ReorderedNorm`: the original norm followed by a gather of its output channels
  (``y[..., perm]``). Choice: the gather is on the output, with the norm's own weight (and
  bias) unchanged, rather than permuting weight and bias and gathering the normalised input;
  both give the same numbers, and this one is bit for bit the original norm's output,
  reordered. The consumers' input columns are permuted the same way: ``W[:, perm] y[perm] = W y``;
- after a linear: the producer's output rows (and bias) are permuted, and the consumer's input
  columns. up_proj -> down_proj: down_proj reads ``act(gate) * up`` element-wise, so gate_proj's
  rows move with up_proj's. v_proj -> o_proj: attention mixes tokens with the same weights for
  every channel of a head, so a permutation is only exact within each head; with grouped-query
  attention the query heads of one group share their KV head's value rows, so they share its
  permutation too (:func:`head_perms`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError


class ReorderedNorm(nn.Module):
    """``norm`` whose output channels come out permuted: ``y[..., j] = norm(x)[..., output_perm[j]]``.

    The wrapped module keeps its parameters (``NAME.norm.weight``); ``NAME.output_perm`` (H,)
    int64 is saved with the checkpoint and read back by ``lowbit.checkpoint``.
    """

    output_perm: torch.Tensor

    def __init__(self, norm: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("output_perm", perm.detach().to(torch.int64).clone())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.norm(x, *args, **kwargs).index_select(-1, self.output_perm)

    def extra_repr(self) -> str:
        return f"reordered output channels: {self.output_perm.numel()}"


def check_perm(perm: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``perm`` as int64 if it is a permutation of ``0..n-1``; a ``LowbitError`` naming ``what`` if not."""
    perm = perm.detach().to(torch.int64).cpu()
    if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise LowbitError(f"{what}: expected a permutation of {n} channels, got shape {tuple(perm.shape)}")
    return perm


def cluster_order(labels: torch.Tensor) -> torch.Tensor:
    """The permutation that makes each cluster contiguous: channels sorted by label, stable (in
    their old order within a cluster). ``labels[cluster_order(labels)]`` is non-decreasing."""
    return torch.sort(labels.detach().cpu(), stable=True).indices


def head_perms(labels: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-head permutations for v_proj -> o_proj from o_proj's input labels (heads * head_dim,).

    Each KV head ``g`` gets one permutation of its ``head_dim`` value channels: the order that
    makes the clusters contiguous in the first query head of its group (``g * heads // kv_heads``;
    with plain multi-head attention, in that very head). Returns (v_perm (kv_heads * head_dim,):
    v_proj's new row order; o_perm (heads * head_dim,): o_proj's new column order).
    """
    if heads % kv_heads or labels.shape != (heads * head_dim,):
        raise LowbitError(
            f"cannot reorder v -> o: {heads} heads, {kv_heads} KV heads, head_dim {head_dim}, {labels.numel()} channels"
        )
    group = heads // kv_heads
    per_head = labels.detach().cpu().reshape(heads, head_dim)
    v_parts = []
    for g in range(kv_heads):
        v_parts.append(g * head_dim + cluster_order(per_head[g * group]))
    v_perm = torch.cat(v_parts)
    o_perm = torch.cat([h * head_dim + (v_parts[h // group] - (h // group) * head_dim) for h in range(heads)])
    return v_perm, o_perm


@torch.no_grad()
def permute_columns(linear: nn.Linear, perm: torch.Tensor) -> None:
    """``W <- W[:, perm]``: the linear now reads its input channels in the new order."""
    perm = check_perm(perm, linear.in_features, "input columns").to(linear.weight.device)
    linear.weight.data = linear.weight.data.index_select(1, perm).contiguous()


@torch.no_grad()
def permute_rows(linear: nn.Linear, perm: torch.Tensor) -> None:
    """``W <- W[perm]``, ``b <- b[perm]``: the linear writes its output channels in the new order."""
    perm = check_perm(perm, linear.out_features, "output rows").to(linear.weight.device)
    linear.weight.data = linear.weight.data.index_select(0, perm).contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, perm).contiguous()


def reorder_norm_output(block: nn.Module, norm_name: str, consumers: list[nn.Linear], perm: torch.Tensor) -> None:
    """Permute the output of the norm ``norm_name`` of ``block`` and the consumers' input columns
    (an already reordered norm composes the two permutations)."""
    module = block.get_submodule(norm_name)
    width = consumers[0].in_features
    perm = check_perm(perm, width, norm_name)
    if isinstance(module, ReorderedNorm):
        module.output_perm = module.output_perm.index_select(0, perm.to(module.output_perm.device))
    else:
        device = next((t.device for t in module.parameters()), torch.device("cpu"))
        block.set_submodule(norm_name, ReorderedNorm(module, perm.to(device)))
    for linear in consumers:
        permute_columns(linear, perm)
