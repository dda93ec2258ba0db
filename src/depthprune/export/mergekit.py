"""A depth plan as a mergekit ``passthrough`` recipe.

mergekit's passthrough stacks slices of a model's layers: ``layer_range:
[a, b]`` takes layers a..b-1 (half-open) of the *original* model. A
removal-only plan is exactly the kept layers' runs of consecutive indices.
Merged layers, compensation and later stages (width pruning, healing) change
weights, which passthrough cannot express, so such plans are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .._version import __version__
from ..errors import InputError
from ..models.arch import per_layer_config_values, spec_for
from ..models.load import ALIASES
from ..paths import cache_dir
from ..plan import Plan
from ..run_record import RunRecord

YAML_MARK = "# written_by: depthprune"


class ExportError(InputError):
    pass


def kept_ranges(plan: Plan) -> list[tuple[int, int]]:
    """Half-open ranges [a, b) of consecutive kept original layers, in order."""
    ranges: list[tuple[int, int]] = []
    for layer in plan.kept:
        if ranges and ranges[-1][1] == layer:
            ranges[-1] = (ranges[-1][0], layer + 1)
        else:
            ranges.append((layer, layer + 1))
    return ranges


def check_passthrough(plan: Plan, run: RunRecord | None = None) -> None:
    """Refuse plans whose result is more than a selection of the original layers (merges, compensation, or a
    checkpoint whose run record shows later stages that changed its weights)."""
    if plan.merges:
        windows = ", ".join(f"{m.low}..{m.high}" for m in plan.merges)
        raise ExportError(f"the plan merges layers ({windows}); mergekit's passthrough can only select "
                          "original layers, so it cannot express merged weights")
    if plan.compensation:
        raise ExportError(f"the plan compensates its gaps ({plan.compensation.fit} fit): changed weights "
                          "that mergekit's passthrough cannot express")
    later = [name for name in (run.names() if run else []) if name != "depth"]
    if later:
        raise ExportError(f"the checkpoint went through later stages ({', '.join(later)}) that changed its "
                          "weights; a passthrough of the base model would not contain them")


def base_model_name(run: RunRecord | None, base_model: str | None) -> str:
    """What mergekit should read: ``--base-model``, else the run record's source model (an alias as its
    converted directory, a relative path that exists here as an absolute one)."""
    if base_model:
        return base_model
    source = run.source if run else None
    if not source:
        raise ExportError("the checkpoint records no source model; pass --base-model (a hub id or a local "
                          "directory)")
    if source in ALIASES:
        converted = cache_dir() / "models" / source
        if not (converted / "config.json").is_file():
            raise ExportError(f"the plan's model is the alias {source!r}, which is not converted on this "
                              "machine; pass --base-model with its hub id or directory")
        return str(converted)
    local = Path(source).expanduser()
    return str(local.resolve()) if local.exists() else source


def per_layer_fields(config: dict[str, Any]) -> list[str]:
    """The config fields holding one entry per layer (Gemma-3's ``layer_types``) that ``config`` has.

    mergekit 0.1.5's passthrough copies them unshortened, so transformers refuses its output
    (``num_hidden_layers (14) must be equal to the number of layer_types (18)``); the export warns.
    """
    try:
        spec = spec_for(SimpleNamespace(**config))
    except InputError:
        return []
    return list(per_layer_config_values(SimpleNamespace(**config), spec))


def per_layer_warning(config: dict[str, Any] | None, plan: Plan) -> str | None:
    """The one-line warning for a recipe over an architecture with per-layer config lists, or None."""
    fields = per_layer_fields(config or {})
    if not fields:
        return None
    return (f"warning: mergekit does not shorten the per-layer config field{'s' * (len(fields) > 1)} "
            f"{', '.join(fields)}: its output keeps {plan.num_layers} entries for {plan.num_layers_after} layers, "
            f"which transformers refuses; set {fields[0]} in its config.json to the kept layers' entries "
            "(as in depthprune's own checkpoint)")


def mergekit_config(plan: Plan, *, base_model: str | None = None, dtype: str | None = None,
                    run: RunRecord | None = None) -> dict[str, Any]:
    """The passthrough recipe as a dict (the YAML's content); ``run`` is the checkpoint's run record."""
    check_passthrough(plan, run)
    model = base_model_name(run, base_model)
    config: dict[str, Any] = {
        "slices": [{"sources": [{"model": model, "layer_range": [a, b]}]} for a, b in kept_ranges(plan)],
        "merge_method": "passthrough",
    }
    if dtype:
        config["dtype"] = dtype
    return config


def mergekit_yaml(plan: Plan, *, base_model: str | None = None, dtype: str | None = None,
                  run: RunRecord | None = None) -> str:
    """The recipe as YAML, headed by a comment saying depthprune wrote it and from which plan.

    Strings are written as JSON strings (valid YAML scalars), so paths with any characters stay exact.
    """
    config = mergekit_config(plan, base_model=base_model, dtype=dtype, run=run)
    lines = [f"{YAML_MARK} {__version__}", f"# plan: {plan.summary()}", "slices:"]
    for piece in config["slices"]:
        source = piece["sources"][0]
        a, b = source["layer_range"]
        lines += ["  - sources:", f"      - model: {json.dumps(source['model'])}", f"        layer_range: [{a}, {b}]"]
    lines.append("merge_method: passthrough")
    if "dtype" in config:
        lines.append(f"dtype: {config['dtype']}")
    return "\n".join(lines) + "\n"
