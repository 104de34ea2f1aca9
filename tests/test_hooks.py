"""Hook context managers leave modules exactly as they found them, also when the body raises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.hooks import StopForward, forward_hooks, replaced_forwards


def test_replaced_forwards_are_restored_after_an_exception() -> None:
    layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    custom = lambda x: x * 3  # noqa: E731 - an instance-level forward, as accelerate sets
    layers[1].forward = custom
    x = torch.ones(1, 2)
    before = [layers[0](x), layers[1](x)]
    with pytest.raises(StopForward), replaced_forwards(layers, lambda i: lambda h: h + i):
        assert torch.equal(layers[0](x), x) and torch.equal(layers[1](x), x + 1)
        raise StopForward
    assert "forward" not in layers[0].__dict__
    assert layers[1].forward is custom
    assert torch.equal(layers[0](x), before[0]) and torch.equal(layers[1](x), before[1])


def test_forward_hooks_are_removed_after_an_exception() -> None:
    lin = nn.Linear(2, 2)
    seen: list[torch.Tensor] = []
    with pytest.raises(RuntimeError), forward_hooks({lin: lambda _m, _i, out: seen.append(out)}):
        lin(torch.ones(1, 2))
        raise RuntimeError("boom")
    lin(torch.ones(1, 2))
    assert len(seen) == 1 and not lin._forward_hooks
