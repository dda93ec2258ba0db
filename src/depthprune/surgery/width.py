"""Structured width pruning: remove MLP channels and attention key/value groups.

Two steps, kept apart like depth pruning's Plan and surgery:

* :func:`width_plan` scores every unit (see :mod:`depthprune.analysis.importance`)
  and decides which units each layer keeps; the result is a JSON-able
  :class:`WidthPlan`.
* :func:`apply_width_plan` slices the weights and makes the config agree, so
  the model saves and reloads as a plain transformers checkpoint.

Uniform width, by necessity: a Hugging Face config has one
``intermediate_size`` and one head count for all layers, so every layer loses
the *same number* of channels and groups (each layer still picks its own
least important ones). Pruning only some layers, or different amounts per
layer (LLM-Pruner's "middle layers only"), would need per-layer sizes that a
plain config cannot express and ``from_pretrained`` could not load.

Attention is pruned by whole key/value groups (GQA): removing key/value head
``g`` also removes the query heads that read it, so the query-per-key ratio
and ``head_dim`` stay as they were. ``config.head_dim`` is written explicitly,
otherwise transformers would recompute it as hidden_size / num_heads on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..analysis.importance import (
    SCORERS,
    Share,
    UnitScores,
    WidthError,
    check_heads_supported,
    check_mlp_supported,
    head_dim_of,
    head_shares,
    mlp_shares,
    score_units,
)
from ..data.calibration import Calibration
from ..models.arch import get_layers, get_path, spec_for
from ..models.mutate import set_config
from ..records import JsonRecord

WIDTH_PLAN_FILE = "depthprune_width_plan.json"


@dataclass
class WidthPlan(JsonRecord):
    """Which MLP channels and key/value groups every layer keeps (indices into the unpruned layer).

    ``keep_mlp`` / ``keep_groups`` are ``None`` when that kind of unit is not
    pruned. ``sizes_before`` holds ``intermediate_size``, ``num_attention_heads``,
    ``num_key_value_heads`` and ``head_dim`` of the model the plan was made for.
    """

    scorer: str
    ratio_mlp: float
    ratio_heads: float
    num_layers: int
    sizes_before: dict[str, int]
    keep_mlp: list[list[int]] | None = None
    keep_groups: list[list[int]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    version: str | None = None
    method: str = "width"

    FILE = WIDTH_PLAN_FILE
    KIND = "depthprune width plan"
    ERROR = WidthError

    def __post_init__(self) -> None:
        if self.version is None:
            self.version = __version__
        self.validate()

    def validate(self) -> None:
        for name, keep, total in (
            ("keep_mlp", self.keep_mlp, self.sizes_before.get("intermediate_size")),
            ("keep_groups", self.keep_groups, self.sizes_before.get("num_key_value_heads")),
        ):
            if keep is None:
                continue
            if total is None:
                raise WidthError(f"{name} is given but sizes_before does not record the matching size")
            if len(keep) != self.num_layers:
                raise WidthError(f"{name} has {len(keep)} layers, the plan says {self.num_layers}")
            sizes = {len(k) for k in keep}
            if len(sizes) != 1:
                raise WidthError(f"{name} keeps different numbers of units per layer ({sorted(sizes)}); "
                                 "a transformers config needs the same width in every layer")
            for k in keep:
                if not k or any(not 0 <= i < total for i in k) or len(set(k)) != len(k):
                    raise WidthError(f"{name} must list distinct unit indices in 0..{total - 1}, at least one")

    @property
    def sizes_after(self) -> dict[str, int]:
        after = dict(self.sizes_before)
        if self.keep_mlp is not None:
            after["intermediate_size"] = len(self.keep_mlp[0])
        if self.keep_groups is not None:
            group = self.sizes_before["num_attention_heads"] // self.sizes_before["num_key_value_heads"]
            after["num_key_value_heads"] = len(self.keep_groups[0])
            after["num_attention_heads"] = len(self.keep_groups[0]) * group
        return after

    def summary(self) -> str:
        b, a = self.sizes_before, self.sizes_after
        parts = [f"width ({self.scorer})"]
        if self.keep_mlp is not None:
            parts.append(f"MLP {b['intermediate_size']} -> {a['intermediate_size']} channels")
        if self.keep_groups is not None:
            parts.append(f"attention {b['num_attention_heads']}/{b['num_key_value_heads']} -> "
                         f"{a['num_attention_heads']}/{a['num_key_value_heads']} query/kv heads")
        if len(parts) == 1:
            parts.append("nothing pruned")
        return "; ".join(parts) + f" in all {self.num_layers} layers"

    def _derived(self) -> dict[str, Any]:
        return {"sizes_after": self.sizes_after}


def current_sizes(model: nn.Module) -> dict[str, int]:
    """The widths of ``model`` as the plan records them, read from the weights (not the config)."""
    spec = spec_for(model)
    layer = get_layers(model)[0]
    sizes: dict[str, int] = {}
    if spec.mlp_size_field is not None:
        down = mlp_shares(layer, spec)[-1]
        sizes["intermediate_size"] = int(down.weight.shape[down.axis])
    config = model.config
    if hasattr(config, "num_key_value_heads"):
        sizes["num_attention_heads"] = int(config.num_attention_heads)
        sizes["num_key_value_heads"] = int(config.num_key_value_heads)
        sizes["head_dim"] = head_dim_of(model)
    return sizes


def units_to_keep(total: int, ratio: float, what: str, flag: str | None = None) -> int:
    """``floor(ratio * total)`` units are removed; at least one must go (a ratio that removes nothing would
    save an unchanged model) and at least one must stay. ``flag`` is the option that set ``ratio``."""
    flag = flag or f"--ratio-{what}"
    if not 0.0 <= ratio < 1.0:
        raise WidthError(f"{flag} must be in [0, 1), got {ratio}")
    removed = int(ratio * total + 1e-9)
    if ratio > 0 and removed == 0:
        raise WidthError(f"{flag} {ratio} removes nothing (floor({ratio} x {total} {what} units) = 0); use at "
                         f"least {1 / total:.3g}, or 0 to leave the {what} width alone")
    keep = total - removed
    if keep < 1:
        raise WidthError(f"{flag} {ratio} would remove all {total} {what} units; use a smaller ratio")
    return keep


def config_sizes(config: dict[str, Any]) -> dict[str, int]:
    """The widths a model's ``config.json`` declares, to check a request before the model is loaded."""
    spec = spec_for(SimpleNamespace(**config))
    sizes = {}
    if spec.mlp_size_field is not None and isinstance(config.get(spec.mlp_size_field), int):
        sizes["intermediate_size"] = config[spec.mlp_size_field]
    if isinstance(config.get("num_key_value_heads"), int):
        sizes["num_key_value_heads"] = config["num_key_value_heads"]
    return sizes


def check_width_request(sizes: dict[str, int], ratio_mlp: float, ratio_heads: float,
                        flags: tuple[str, str] = ("--ratio-mlp", "--ratio-heads")) -> None:
    """Refuse ratios that remove nothing or everything of the widths in ``sizes``."""
    for what, ratio, key, flag in (("mlp", ratio_mlp, "intermediate_size", flags[0]),
                                   ("heads", ratio_heads, "num_key_value_heads", flags[1])):
        if ratio > 0 and key in sizes:
            units_to_keep(sizes[key], ratio, what, flag)


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(int(i) for i in order[:keep])


def _kept_fraction(scores: list[torch.Tensor], keep: list[list[int]]) -> list[float]:
    return [float(s[k].sum() / s.sum()) if float(s.sum()) > 0 else 1.0 for s, k in zip(scores, keep)]


def width_plan(
    model: nn.Module,
    calibration: Calibration | None = None,
    ratio_mlp: float = 0.2,
    ratio_heads: float = 0.0,
    scorer: str = "magnitude",
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> WidthPlan:
    """Decide which MLP channels and key/value groups every layer keeps.

    Every layer removes ``floor(ratio_mlp * intermediate_size)`` channels and
    ``floor(ratio_heads * num_key_value_heads)`` key/value groups (with their
    query heads), the lowest-scoring ones of that layer. ``calibration`` is
    needed by ``wanda`` and ``taylor``. The model is not modified.
    """
    if scorer not in SCORERS:
        raise WidthError(f"unknown width scorer {scorer!r}: use one of {', '.join(SCORERS)}")
    spec = spec_for(model)
    n_layers = len(get_layers(model))
    if ratio_mlp > 0:
        check_mlp_supported(spec)
    if ratio_heads > 0:
        check_heads_supported(spec)
    sizes = current_sizes(model)
    keep_mlp_n = units_to_keep(sizes.get("intermediate_size", 0), ratio_mlp, "mlp") if ratio_mlp > 0 else None
    keep_groups_n = (units_to_keep(sizes["num_key_value_heads"], ratio_heads, "heads")
                     if ratio_heads > 0 else None)

    scores: UnitScores | None = None
    if keep_mlp_n is not None or keep_groups_n is not None:
        scores = score_units(model, scorer, calibration, mlp=keep_mlp_n is not None,
                             heads=keep_groups_n is not None, batch_size=batch_size, progress=progress)
    params: dict[str, Any] = {}
    keep_mlp = keep_groups = None
    if scores is not None and keep_mlp_n is not None:
        keep_mlp = [_top(s, keep_mlp_n) for s in scores.mlp]
        params["mlp_score_kept"] = _kept_fraction(scores.mlp, keep_mlp)
    if scores is not None and keep_groups_n is not None:
        keep_groups = [_top(s, keep_groups_n) for s in scores.heads]
        params["group_scores"] = [[float(v) for v in s] for s in scores.heads]
    needs_data = scorer != "magnitude" and scores is not None
    return WidthPlan(
        scorer=scorer,
        ratio_mlp=float(ratio_mlp),
        ratio_heads=float(ratio_heads),
        num_layers=n_layers,
        sizes_before=sizes,
        keep_mlp=keep_mlp,
        keep_groups=keep_groups,
        params=params,
        calibration=calibration.to_dict() if (needs_data and calibration is not None) else {},
    )


def _feature_index(units: list[int], unit_size: int, device: torch.device) -> torch.Tensor:
    u = torch.tensor(units, dtype=torch.long, device=device)
    return (u.unsqueeze(1) * unit_size + torch.arange(unit_size, device=device)).reshape(-1)


@torch.no_grad()
def _keep_units(share: Share, units: list[int]) -> None:
    """Slice one matrix down to the features of ``units`` and fix its size attributes."""
    module, weight = share.module, share.weight
    index = _feature_index(units, share.unit_size, weight.device)
    module.weight = nn.Parameter(weight.index_select(share.axis, index).clone(), requires_grad=weight.requires_grad)
    bias = getattr(module, "bias", None)
    if share.side == "out" and bias is not None:
        module.bias = nn.Parameter(bias.index_select(0, index).clone(), requires_grad=bias.requires_grad)
    n = int(index.numel())
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if share.side == "out" else "in_features", n)
    else:
        setattr(module, "nf" if share.side == "out" else "nx", n)


def _parent(layer: nn.Module, path: str) -> nn.Module:
    parent, _, _ = path.rpartition(".")
    return get_path(layer, parent) if parent else layer


def _set_existing(module: nn.Module, values: dict[str, int]) -> None:
    for name, value in values.items():
        if name in vars(module):
            setattr(module, name, value)


def apply_width_plan(model: nn.Module, plan: WidthPlan) -> nn.Module:
    """Prune ``model`` in place according to ``plan`` and return it.

    Slices q/k/v rows and o columns per kept group, gate/up rows and down
    columns per kept channel (fc1/fc2, c_fc/c_proj on GPT-2, NeoX and OPT),
    then sets ``intermediate_size`` (or ``ffn_dim`` / ``n_inner``),
    ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` on the
    config and the matching attributes of each attention and MLP module.
    """
    spec = spec_for(model)
    layers = list(get_layers(model))
    if len(layers) != plan.num_layers:
        raise WidthError(f"the width plan was made for {plan.num_layers} layers but the model has "
                         f"{len(layers)}; apply it to the model it was made for")
    sizes = current_sizes(model)
    for name, value in plan.sizes_before.items():
        if sizes.get(name) != value:
            raise WidthError(f"the width plan was made for {name}={value} but the model has {sizes.get(name)}; "
                             "apply it to the model it was made for")
    if plan.keep_mlp is not None:
        check_mlp_supported(spec)
    if plan.keep_groups is not None:
        check_heads_supported(spec)
    after = plan.sizes_after

    if plan.keep_mlp is not None:
        for layer, keep in zip(layers, plan.keep_mlp):
            for share in mlp_shares(layer, spec):
                _keep_units(share, keep)
            _set_existing(_parent(layer, spec.projections["down"]), {"intermediate_size": after["intermediate_size"]})
        set_config(model, **{spec.mlp_size_field: after["intermediate_size"]})

    if plan.keep_groups is not None:
        head_dim = plan.sizes_before["head_dim"]
        shares = [head_shares(layer, spec, model.config, head_dim) for layer in layers]
        for layer_shares, keep in zip(shares, plan.keep_groups):
            for share in layer_shares:
                _keep_units(share, keep)
        group = plan.sizes_before["num_attention_heads"] // plan.sizes_before["num_key_value_heads"]
        values = {
            "num_heads": after["num_attention_heads"],
            "num_attention_heads": after["num_attention_heads"],
            "num_key_value_heads": after["num_key_value_heads"],
            "num_key_value_groups": group,
            "head_dim": head_dim,
        }
        for layer in layers:
            _set_existing(get_path(layer, spec.attention), values)
        set_config(model, num_attention_heads=after["num_attention_heads"],
                   num_key_value_heads=after["num_key_value_heads"], head_dim=head_dim)
    return model


__all__ = [
    "WIDTH_PLAN_FILE",
    "WidthPlan",
    "apply_width_plan",
    "current_sizes",
    "width_plan",
]
