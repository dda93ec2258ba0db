"""Merge decoder layers ``low..high`` into one layer with an operator of :mod:`depthprune.operators`: the
projections (the matrices and biases named in the architecture's ``projections``) are merged, every other
parameter (the norms) comes from layer ``low``."""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import ArchSpec
from ..operators import OPERATORS, check_operator, is_projection, merge_params

__all__ = ["OPERATORS", "check_operator", "is_projection", "merge_into_first", "merge_params"]


@torch.no_grad()
def merge_into_first(layers: list[nn.Module], operator: str, spec: ArchSpec) -> nn.Module:
    """Overwrite ``layers[0]``'s projections with the merge, in place (no extra layer in memory)."""
    check_operator(operator)
    if len(layers) < 2 or operator == "drop":
        return layers[0]
    merged = merge_params([dict(layer.named_parameters()) for layer in layers], operator, spec)
    own = dict(layers[0].named_parameters())
    for name, value in merged.items():
        own[name].copy_(value)
    return layers[0]
