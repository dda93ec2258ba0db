"""Apply a depth plan in place.

Order of work: compute merges from the original weights, keep the surviving
layers in their original order, then let :func:`set_layer_stack` renumber
``layer_idx`` (the KV cache indexes by it) and shorten the config's per-layer
lists (e.g. Gemma's ``layer_types``), so the checkpoint loads in plain transformers.
"""

from __future__ import annotations

from typing import Any

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


def apply_plan(model: nn.Module, plan: Plan, *, calibration: Any = None, tokenizer: Any = None,
               batch_size: int = 8) -> nn.Module:
    """Prune ``model`` in place according to ``plan`` and return it.

    A plan that compensates its gaps (``plan.compensation``) is applied with its maps re-fitted exactly as the
    job that made it fitted them: on the fit windows of ``calibration`` (the job's
    :class:`~depthprune.data.calibration.CalibrationSpec`, e.g. ``CalibrationSpec(**report["settings"]
    ["calibration"])``) tokenized by ``tokenizer``, so the result equals the saved checkpoint. Without them it
    refuses: a plan applied without its compensation would silently be another model.
    """
    overrides = None
    if plan.compensation:
        from ..compensate import Compensation, fit_compensation

        if calibration is None or tokenizer is None:
            raise PlanError(
                f"this plan compensates its gaps ({plan.compensation.get('fit')} fit): re-fitting needs the "
                "calibration text and the tokenizer; pass calibration=CalibrationSpec(...) (the settings in the "
                "checkpoint's report.json) and tokenizer=, or use the saved checkpoint itself")
        config = Compensation.recorded(plan.compensation)
        count = max(1, -(-config.fit_tokens(calibration.seq_len) // calibration.seq_len))
        windows = calibration.fit_windows(tokenizer, count, config.seed)
        overrides = fit_compensation(model, plan, list(windows.batches(batch_size)), config).overrides
    surgery(model, plan)
    if overrides:
        from ..backend.memory import write_overrides

        write_overrides(model, overrides)
    return model
