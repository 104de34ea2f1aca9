"""What every algorithm sees: the block being quantized, its calibration inputs, a registry.

Transforms change float weights into an equivalent block; quantizers turn target weights into
``QuantizedWeight``s (``ctx.qweights``). The pipeline swaps in QuantLinear modules afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.archs import Arch
from lowbit.bcq import BCQWeight
from lowbit.errors import LowbitError
from lowbit.hooks import StopForward, forward_hooks, forward_pre_hooks
from lowbit.qweight import QuantizedWeight
from lowbit.scheme import QuantSpec, Recipe, Scheme


@dataclass
class BlockContext:
    """One decoder block during quantization.

    ``inputs``: per calibration batch, the block's hidden states (B, T, H) and the keyword
    arguments the model passed to it (position embeddings, masks). ``targets``: relative module
    name -> the Linear to quantize; ``specs``: its (weights, input_activations) specs.
    """

    block: nn.Module
    index: int
    prefix: str
    arch: Arch
    scheme: Scheme
    inputs: Sequence[tuple[torch.Tensor, dict[str, Any]]]
    targets: dict[str, nn.Linear]
    specs: dict[str, tuple[QuantSpec | None, QuantSpec | None]]
    qweights: dict[str, QuantizedWeight | BCQWeight] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    passes: int = 0  # passes over the calibration inputs made so far (whole or stopped early)
    # per-cluster activation quantization (RPTQ): target name -> its input channels' cluster (in,)
    # int64, chosen by a transform; the swap stage hands them to the target's ActQuantizer
    act_clusters: dict[str, torch.Tensor] = field(default_factory=dict)
    # for reconstruct steps (set by the runner after the quantizers): the float block's outputs on
    # ``inputs`` (the reference the measure stage compares with), one (B, T, H) tensor per batch,
    # and the static input-activation ranges the float pass observed (target name -> (lo, hi))
    teacher: Sequence[torch.Tensor] | None = None
    # with a step that asks for the float model's path (``Algorithm.float_path``): the float
    # model's own hidden states entering this block, one (B, T, H) tensor per batch (``teacher``
    # is then the float block's outputs on them)
    float_inputs: Sequence[torch.Tensor] | None = None
    act_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    progress: bool = False  # whether a long step may show its own progress bar

    def forward(self, hooks: Mapping[nn.Module, Callable[..., Any]] | None = None) -> list[torch.Tensor]:
        """Run the block over every calibration batch; returns the output hidden states per batch."""
        return list(self.forward_iter(hooks))

    def forward_iter(self, hooks: Mapping[nn.Module, Callable[..., Any]] | None = None) -> Iterator[torch.Tensor]:
        """``forward`` one batch at a time, so the outputs can go to a store instead of a list."""
        self.passes += 1
        with torch.no_grad(), forward_hooks(hooks or {}):
            for hidden, kwargs in self.inputs:
                out = self.block(hidden, **kwargs)
                yield out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def feed_inputs(
        self, consumers: Mapping[nn.Module, Callable[[torch.Tensor], None]], stop_early: bool = True
    ) -> None:
        """Run the block over every calibration batch, handing each listed module's input to its consumer.

        With ``stop_early`` a batch's pass ends as soon as every listed module has been fed, so
        collecting the inputs of early sub-layers costs only the part of the block before them.
        """
        fed: set[nn.Module] = set()
        self.passes += 1

        def make(module: nn.Module, consume: Callable[[torch.Tensor], None]) -> Callable[..., None]:
            def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
                consume(inp[0])
                fed.add(module)
                if stop_early and len(fed) == len(consumers):
                    raise StopForward

            return hook

        with forward_pre_hooks({m: make(m, c) for m, c in consumers.items()}):
            for hidden, kwargs in self.inputs:
                fed.clear()
                with contextlib.suppress(StopForward):
                    self.block(hidden, **kwargs)


class Algorithm(ABC):
    """Base of registered algorithms. Subclasses are dataclasses of their parameters."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "transform", "quantizer" or "reconstruct" (refines ctx.qweights after the quantizers)
    # what the step reads besides the weights: "inputs" (the block's calibration inputs, for
    # statistics, Hessians or a search); empty for a data-free step (RTN), which lets a run make no
    # forward pass at all
    needs: ClassVar[frozenset[str]] = frozenset({"inputs"})
    # whether the step gives the single-process result when the calibration samples are split over
    # data-parallel workers (its statistics are all-reduced); steps that search or train on their
    # own share of the samples would decide differently on each worker, and are refused there
    data_parallel: ClassVar[bool] = False
    # a model-level search (SmoothQuant+'s alpha): the samples it uses; see ``model_candidates``
    search_samples: int = 0

    def float_path(self) -> bool:
        """Whether this step, as configured, reconstructs against the float *model*: the runner then
        carries the float model's hidden states beside the quantized ones and sets ``ctx.teacher`` to
        the float block's outputs on them (BRECQ's and AutoRound's asymmetric target), instead of the
        float block's outputs on the quantized model's inputs. False by default."""
        return False

    def splits_exactly(self) -> bool:
        """Whether this step, as configured, may run on data-parallel workers (``data_parallel``)."""
        return self.data_parallel

    def see_model(self, model: nn.Module, recipe: Recipe) -> None:
        """Told the model (possibly a meta-device skeleton: names and shapes) and the recipe before
        ``model_candidates``, for searches whose candidates are per layer (MoFQ). Nothing by default."""
        return None

    def model_candidates(self, recipe: Recipe) -> list[tuple[Any, Recipe]]:
        """A search whose loss is the model's output (SmoothQuant+'s alpha): (candidate, the recipe
        that realises it) pairs. The runner runs each candidate recipe in place on the first
        ``search_samples`` calibration sequences, scores it by ``KL(float || quantized)`` of the
        next-token distributions, restores the float weights, and calls ``choose``. None by default."""
        return []

    def choose(self, results: list[tuple[Any, float]]) -> None:
        """Told each candidate's loss (in ``model_candidates``' order), keep the best."""
        return None

    @abstractmethod
    def apply(self, ctx: BlockContext) -> None:
        """Change ``ctx.block``'s float weights (a transform), fill ``ctx.qweights`` (a quantizer) or
        refine them against ``ctx.teacher`` (a reconstruct step)."""


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(name: str, kind: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: make an algorithm available to recipes as ``name``."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name, cls.kind = name, kind
        ALGORITHMS[name] = cls
        return cls

    return deco


def build_algorithm(name: str, params: Mapping[str, Any]) -> Algorithm:
    """Instantiate a registered algorithm, with errors naming unknown steps or parameters."""
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LowbitError(f"unknown recipe step {name!r}{hint}; available: {', '.join(sorted(ALGORITHMS))}")
    cls = ALGORITHMS[name]
    valid: list[str] = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LowbitError(f"step {name!r}: unknown parameter {key!r}{hint}; valid: {', '.join(valid) or 'none'}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise LowbitError(f"step {name!r}: {e}") from None
