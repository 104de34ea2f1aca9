"""Context managers that install forward hooks and always remove them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

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
