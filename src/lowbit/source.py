"""Placeholder until the block source lands: an already-loaded model."""

from __future__ import annotations

import torch
from torch import nn


class InMemorySource:
    in_memory = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load(self, prefix: str) -> None:
        return None

    def load_outer(self) -> None:
        return None

    def release(self, prefix: str) -> None:
        return None

    def float_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.get_submodule(prefix).state_dict().items()}
