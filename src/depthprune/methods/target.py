"""Turn a depth target into a threshold for threshold-driven searches (SLM, LaCo).

The papers only take a similarity threshold T; users ask for a ratio or a
layer count. Searches run with a layer budget (they stop once the target is
reached), so the number of layers removed at T is at most the target. The
rule: bisect T on [0, 1] for the *highest* threshold whose budgeted search
still reaches the target, i.e. the strictest similarity requirement that
yields the requested depth. Candidate similarities are memoised by the caller,
so the bisection's repeated windows cost nothing.
"""

from __future__ import annotations

from typing import Callable

from ..plan import Plan, PlanError

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
