"""Remove and merge a model's layers in place, as a plan says (the structural half of applying a plan).

Order of work: compute merges from the original weights, keep the surviving
layers in their original order, then let :func:`set_layer_stack` renumber
``layer_idx`` (the KV cache indexes by it) and shorten the config's per-layer
lists (e.g. Gemma's ``layer_types``), so the checkpoint loads in plain transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.arch import get_layers, per_layer_config_values, spec_for
from ..models.mutate import set_layer_stack, stale_per_layer_fields
from ..plan import Plan, PlanError
from .merge import merge_into_first


def surgery(model: nn.Module, plan: Plan) -> nn.Module:
    """Remove and merge layers of ``model`` in place as ``plan`` says (its compensation is not applied here)."""
    spec = spec_for(model)
    layers = get_layers(model)
    if len(layers) != plan.num_layers:
        raise PlanError(
            f"the plan was made for {plan.num_layers} layers but the model has {len(layers)}; "
            "apply a plan to the model it was made for"
        )
    stale = stale_per_layer_fields(model.config, len(layers), spec)
    if stale:
        raise PlanError(
            f"config fields {stale} look per-layer but the {spec.family} spec does not list them; "
            "add them to per_layer_config in depthprune/models/arch.py"
        )
    for index, m in enumerate(plan.merges):
        merge_into_first([layers[i] for i in plan.merge_members(index)], m.operator, spec)
    kept = plan.kept
    per_layer = {
        name: [values[i] for i in kept]
        for name, values in per_layer_config_values(model.config, spec).items()
    }
    set_layer_stack(model, [layers[i] for i in kept], per_layer)
    return model


@torch.no_grad()
def write_overrides(model: nn.Module, overrides: dict[int, dict[str, torch.Tensor]]) -> None:
    """Copy ``overrides`` (position -> parameter name inside the layer -> value) into the model's layers."""
    layers = get_layers(model)
    for position, changes in overrides.items():
        params = dict(layers[position].named_parameters())
        for name, value in changes.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
