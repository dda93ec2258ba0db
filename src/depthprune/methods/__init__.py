"""Registry of depth-pruning methods. Each takes a model, calibration windows,
an optional depth target and its own options, and returns a :class:`Plan`.

Methods only decide; :func:`depthprune.apply_plan` changes weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..analysis.stats import layer_statistics
from ..data.calibration import Calibration
from ..models.arch import num_layers
from ..plan import Plan, PlanError, layers_to_remove
from .angular import plan_angular
from .shortgpt import plan_shortgpt


@dataclass(frozen=True)
class Target:
    """How deep the result should be: exactly one of ratio / remove / keep (or none)."""

    ratio: float | None = None
    remove: int | None = None
    keep: int | None = None

    @property
    def given(self) -> bool:
        return any(x is not None for x in (self.ratio, self.remove, self.keep))

    def validate(self) -> "Target":
        """Check what can be checked before the model is loaded."""
        if sum(x is not None for x in (self.ratio, self.remove, self.keep)) > 1:
            raise PlanError("give only one of --ratio, --remove-layers, --keep-layers")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise PlanError(f"--ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        for name, value in (("--remove-layers", self.remove), ("--keep-layers", self.keep)):
            if value is not None and value < 1:
                raise PlanError(f"{name} must be at least 1, got {value}")
        return self

    def n_remove(self, num_layers: int) -> int:
        return layers_to_remove(num_layers, ratio=self.ratio, remove=self.remove, keep=self.keep)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


MethodFn = Callable[..., Plan]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MethodFn
    summary: str


METHODS: dict[str, MethodInfo] = {}


def register(name: str, summary: str) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = MethodInfo(name, fn, summary)
        return fn

    return deco


def _require_target(method: str, target: Target | None) -> Target:
    if target is None or not target.given:
        raise PlanError(f"--method {method} needs a depth: pass --ratio, --remove-layers or --keep-layers")
    return target


@register("shortgpt", "remove the k layers with the lowest Block Influence (ShortGPT)")
def _shortgpt(model: nn.Module, calibration: Calibration, target: Target | None = None, *,
              metric: str = "bi", batch_size: int = 4, progress: bool = True, **_: Any) -> Plan:
    n = _require_target("shortgpt", target).n_remove(num_layers(model))
    stats = layer_statistics(model, calibration, batch_size=batch_size, progress=progress)
    plan = plan_shortgpt(stats, n, metric=metric)
    plan.params["target"] = target.to_dict()
    return plan


@register("angular", "remove the contiguous block with the smallest angular distance (Gromov et al.)")
def _angular(model: nn.Module, calibration: Calibration, target: Target | None = None, *,
             block: int | None = None, batch_size: int = 4, progress: bool = True, **_: Any) -> Plan:
    if block is None:
        block = _require_target("angular", target).n_remove(num_layers(model))
    elif target is not None and target.given:
        raise PlanError("--method angular takes either --block or a depth target, not both")
    if not 1 <= block < num_layers(model):
        raise PlanError(f"--block must be between 1 and {num_layers(model) - 1}, got {block}")
    stats = layer_statistics(model, calibration, batch_size=batch_size, progress=progress)
    return plan_angular(stats, block)


def method_names() -> list[str]:
    return list(METHODS)


def make_plan(method: str, model: nn.Module, calibration: Calibration, target: Target | None = None,
              **options: Any) -> Plan:
    """Run a registered method; unknown names get an error listing the known ones."""
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return METHODS[method].fn(model, calibration, target, **options)
