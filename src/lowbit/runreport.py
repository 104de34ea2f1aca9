"""What a quantization run reports: one row per quantized layer, the block errors, the warnings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lowbit.scheme import Recipe, to_dict


@dataclass
class LayerReport:
    name: str
    weights: str
    activations: str
    # ||y_q - y||^2 / ||y||^2 of the layer's output on (up to ERROR_TOKENS) calibration inputs;
    # for a run without calibration passes (a data-free recipe) the weights' ||W_q - W||^2 / ||W||^2
    rel_error: float
    bits_per_weight: float
    extra: dict[str, float] = field(default_factory=dict)
    # LLM.int8(): input dimensions kept in float on the calibration inputs, most frequent first (at most 16)
    outlier_dims: list[int] | None = None
    fallback: str | None = None  # the quantizer fell back to another, e.g. "rtn (Hessian is all zero: ...)"
    error_on: str = "outputs"  # what rel_error compares: "outputs" (calibration) or "weights" (data-free)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        return cls(**d)


@dataclass
class RunReport:
    recipe: Recipe
    layers: list[LayerReport]
    block_errors: list[float]  # per block ||out_q - out||^2 / ||out||^2; empty for a data-free run
    seconds: float
    n_samples: int
    seq_len: int
    warnings: list[str] = field(default_factory=list)  # what the user should know, e.g. layers that fell back
    forward_passes: int = 0  # block forward passes over the calibration set (0: a data-free run)
    spilled_bytes: int = 0  # activations written to disk because of the memory budget
    # per block ||out_q - out_float_model||^2 / ||out_float_model||^2, against the float model's own
    # hidden states (what the blocks before left counts too); only in runs that carry the float
    # model's path (a step with teacher: model), else empty
    model_errors: list[float] = field(default_factory=list)

    def worst_layers(self, n: int) -> list[LayerReport]:
        """The ``n`` layers with the largest relative output error."""
        return sorted(self.layers, key=lambda r: r.rel_error, reverse=True)[:n]

    def provenance(self, base_model: str | None) -> dict[str, Any]:
        """What a checkpoint's ``lowbit.json`` records of the run: scheme, recipe, this report."""
        return {
            "scheme": to_dict(self.recipe.scheme),
            "recipe": to_dict(self.recipe),
            "report": self.to_dict(),
            "base_model": base_model,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": to_dict(self.recipe),
            "layers": [asdict(layer) for layer in self.layers],
            "block_errors": self.block_errors,
            "model_errors": self.model_errors,
            "seconds": self.seconds,
            "calibration": {"samples": self.n_samples, "seq_len": self.seq_len},
            "warnings": self.warnings,
            "forward_passes": self.forward_passes,
            "spilled_bytes": self.spilled_bytes,
        }
