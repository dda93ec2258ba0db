"""Depth targets: how many layers to remove, and how threshold-driven searches reach a target.

A user asks for a depth in one of three ways (``--ratio``, ``--remove-layers``,
``--keep-layers``); :class:`Target` holds the request and turns it into a
number of layers to remove once the model's depth is known.

The papers' merging searches (SLM, LaCo) only take a similarity threshold T.
Searches run with a layer budget (they stop once the target is reached), so
the number of layers removed at T is at most the target. The rule: bisect T on
[0, 1] for the *highest* threshold whose budgeted search still reaches the
target, i.e. the strictest similarity requirement that yields the requested
depth. Candidate similarities are memoised by the caller, so the bisection's
repeated windows cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..plan import Plan, PlanError


def layers_to_remove(
    num_layers: int,
    *,
    ratio: float | None = None,
    remove: int | None = None,
    keep: int | None = None,
) -> int:
    """Turn exactly one of ratio / remove / keep into a number of layers to remove.

    ``ratio`` removes ``floor(ratio * L)`` layers (at least one), so
    ``--ratio 0.25`` on a 30-layer model removes 7 and keeps 23.
    """
    given = [x is not None for x in (ratio, remove, keep)]
    if sum(given) != 1:
        raise PlanError("give exactly one of --ratio, --remove-layers, --keep-layers")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise PlanError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
        n = max(1, int(ratio * num_layers + 1e-9))
    elif remove is not None:
        n = int(remove)
    else:
        n = num_layers - int(keep)  # type: ignore[arg-type]
    if n < 1:
        raise PlanError(f"nothing to remove: the model has {num_layers} layers")
    if n >= num_layers:
        raise PlanError(
            f"cannot remove {n} of {num_layers} layers; at least one layer must remain"
        )
    return n


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


def given(target: Target | None) -> bool:
    return target is not None and target.given


def require(method: str, target: Target | None) -> Target:
    """The target of a method that cannot work without one."""
    if target is None or not target.given:
        raise PlanError(f"--method {method} needs a depth: pass --ratio, --remove-layers or --keep-layers")
    return target


SearchAt = Callable[[float, int], Plan]


def removed(plan: Plan) -> int:
    return plan.num_layers - plan.num_layers_after


def threshold_for_target(search: SearchAt, n_remove: int, *, iterations: int = 12) -> Plan:
    """Run ``search(threshold, n_remove)`` under bisection; return the plan at the threshold found."""
    history: list[dict[str, float]] = []

    def attempt(threshold: float) -> Plan:
        plan = search(threshold, n_remove)
        history.append({"threshold": threshold, "removed": removed(plan)})
        return plan

    lo = 0.0
    best = attempt(lo)
    if removed(best) < n_remove:
        lo = -1.0
        best = attempt(lo)
        if removed(best) < n_remove:
            raise PlanError(
                f"target unreachable: even with every window accepted the search removes only "
                f"{removed(best)} layers, fewer than the {n_remove} requested; ask for fewer layers "
                "or widen the layer range"
            )
    hi = 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        plan = attempt(mid)
        if removed(plan) >= n_remove:
            lo, best = mid, plan
        else:
            hi = mid
    best.params["threshold_search"] = {"target_remove": n_remove, "rule": "highest T reaching the target",
                                       "tried": history}
    return best
