"""Compression on the torch side: recipes, pruning, weight sharing, int8, distillation, fidelity."""

from edgec.compressor.pipeline import CompressResult, StepReport, compress
from edgec.compressor.recipe import (
    BUILTIN_RECIPES,
    DistillStep,
    Floor,
    PruneStep,
    QuantizeStep,
    Recipe,
    ShareStep,
    SmoothStep,
    load_recipe,
)

__all__ = [
    "BUILTIN_RECIPES",
    "CompressResult",
    "DistillStep",
    "Floor",
    "PruneStep",
    "QuantizeStep",
    "Recipe",
    "ShareStep",
    "SmoothStep",
    "StepReport",
    "compress",
    "load_recipe",
]
