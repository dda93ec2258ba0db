"""Where a plan leaves gaps: the kept layer before each one must hand on what the original had after it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..models.arch import ArchSpec
from ..plan import Plan


@dataclass(frozen=True)
class Interface:
    """The kept layer at ``position`` of the pruned stack (original index ``layer``) must hand on what the
    original model had after its layer ``target``."""

    position: int
    layer: int
    target: int


def check_supported(spec: ArchSpec) -> None:
    """Every supported family can carry a compensation (a full map, or a rotation and scale); kept as the one
    place to refuse a family that could not."""
    if spec.post_mlp_norm is not None and not spec.projections.get("down"):
        raise InputError(f"compensation needs a down projection to fold into; {spec.family} declares none")


def fold_kind(spec: ArchSpec) -> str:
    return "qd" if spec.post_mlp_norm is not None else "full"


def interfaces(plan: Plan) -> tuple[list[Interface], list[str]]:
    """Every place where the pruned model stops matching the original, and notes on gaps that cannot be fitted."""
    ends = {m.low: m.high for m in plan.merges}
    kept = plan.kept
    found, notes = [], []
    if kept and kept[0] > 0:
        notes.append(f"layers 0..{kept[0] - 1} are gone with no layer before them to carry a map: not compensated")
    for position, layer in enumerate(kept):
        following = kept[position + 1] if position + 1 < len(kept) else plan.num_layers
        if following - 1 > layer:
            found.append(Interface(position, layer, following - 1))
        elif ends.get(layer, layer) > layer:
            found.append(Interface(position, layer, ends[layer]))
    return found, notes
