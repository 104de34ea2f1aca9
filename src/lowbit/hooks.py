"""Context managers that install forward hooks and always remove them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def forward_hooks(hooks: Mapping[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Install ``module -> hook(module, inputs, output)`` forward hooks for the ``with`` body."""
    handles = []
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


@contextmanager
def capture_inputs(module: nn.Module, store: list[tuple[torch.Tensor, dict[str, Any]]]) -> Iterator[None]:
    """Record ``(hidden_states, kwargs)`` of every call to ``module`` and stop the forward pass there.

    Callers run the model inside ``with`` and catch ``StopForward``.
    """

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], dict(kwargs)
        else:
            rest = dict(kwargs)
            hidden = rest.pop("hidden_states")
        store.append((hidden.detach(), rest))
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
