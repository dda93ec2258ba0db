"""LaCo: Layer Collapse (Yang et al., arXiv 2402.11187).

Walk a merge point ``l`` down from ``H - C`` to ``L_low``. At each point,
collapse the C layers ``l..l+C-1`` of the *current* model into layer ``l``
(RDSC in the paper; the operator is configurable) and compare the result with
the original model (final-hidden-state cosine on the calibration set D)::

    l = H - C
    while l >= L_low:
        candidate = merge(current, l, l+1, ..., l+C-1)
        if sim(original, candidate) > T:  current = candidate; l -= I     # accept
        else:                             l -= 1                          # move on
        stop once the target layer count is reached

Indices are positions in the current model, so with I < C a later merge can
collapse an earlier merged layer again (recorded as a merge containing the
earlier one). With a layer budget, the last merge takes only as many layers
as are still wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backend import Backend
from ..data.calibration import Calibration
from ..engine.search import SimilarityEngine
from ..engine.stack import CurrentStack
from ..plan import Merge, Plan, PlanError
from ..operators import OPERATORS
from .merging import Search, ThresholdOptions, run_threshold_search
from .registry import RunContext, option, register
from .target import Target

DEFAULT_THRESHOLD = 0.65
DEFAULT_OPERATOR = "rdsc"
DEFAULT_MERGE_LAYERS = 4
DEFAULT_INTERVAL = 2


@dataclass
class LaCoOptions(ThresholdOptions):
    operator: str = option(DEFAULT_OPERATOR, "merge operator (rdsc = the paper's formula)",
                           choices=OPERATORS)
    merge_layers: int = option(DEFAULT_MERGE_LAYERS, "C: layers collapsed per merge")
    interval: int = option(DEFAULT_INTERVAL, "I: positions to step down after an accepted merge")
    lowest: int = option(1, "L_low: lowest merge position")
    highest: int | None = option(None, "H: top of the layer range (default: the model's depth L)")

    DEFAULT_THRESHOLD = DEFAULT_THRESHOLD

    def validate(self) -> None:
        super().validate()
        check_laco_options(None, self.merge_layers, self.interval, self.lowest, self.highest)

    def check_depth(self, num_layers: int) -> None:
        highest = num_layers if self.highest is None else self.highest
        check_laco_options(num_layers, self.merge_layers, self.interval, self.lowest, highest)


def check_laco_options(num_layers: int | None, merge_layers: int, interval: int, lowest: int,
                       highest: int | None) -> None:
    """LaCo's settings, the one place they are checked: C, I and L_low alone (``num_layers`` None, before the
    model's depth is known), and with the depth the layer range [L_low, H] and a window of C inside it."""
    if merge_layers < 2:
        raise PlanError(f"LaCo needs C >= 2 layers per merge, got {merge_layers}")
    if interval < 1:
        raise PlanError(f"LaCo's interval I must be at least 1, got {interval}")
    if lowest < 0:
        raise PlanError(f"LaCo's lowest merge position must be 0 or more, got {lowest}")
    if num_layers is None or highest is None:
        return
    if not 0 <= lowest < highest <= num_layers:
        raise PlanError(
            f"LaCo layer range [{lowest}, {highest}] is empty or outside the model's 0..{num_layers}"
        )
    if highest - merge_layers < lowest:
        raise PlanError(
            f"LaCo layer range [{lowest}, {highest}] holds no window of C={merge_layers} layers"
        )


def laco_search(
    engine: SimilarityEngine,
    threshold: float,
    *,
    operator: str = DEFAULT_OPERATOR,
    merge_layers: int = DEFAULT_MERGE_LAYERS,
    interval: int = DEFAULT_INTERVAL,
    lowest: int = 1,
    highest: int | None = None,
    max_remove: int | None = None,
    memo: dict | None = None,
    progress: Any = None,
) -> Plan:
    """One LaCo pass at ``threshold``; every merge tried is logged with its similarity and decision."""
    L = engine.num_layers
    highest = L if highest is None else highest
    check_laco_options(L, merge_layers, interval, lowest, highest)
    memo = {} if memo is None else memo
    stack = CurrentStack(engine, operator)
    merges: list[Merge] = []
    log: list[dict[str, Any]] = []
    l = highest - merge_layers
    while l >= lowest:
        last = min(l + merge_layers - 1, len(stack) - 1)
        if max_remove is not None:
            last = min(last, l + max_remove - stack.removed)
        key = stack.candidate_key(l, last)
        if key not in memo:
            memo[key] = stack.similarity(l, last)
        sim = memo[key]
        window = (stack.entries[l].low, stack.entries[last].high)
        log.append({"position": l, "low": window[0], "high": window[1], "layers": last - l + 1,
                    "similarity": sim})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(at=l, sim=f"{sim:.4f}", merged=stack.removed)
        if sim > threshold:
            stack.commit(l, last)
            merges.append(Merge(window[0], window[1], operator))
            log[-1]["decision"] = f"accept: collapse {window[0]}..{window[1]}"
            l -= interval
            if max_remove is not None and stack.removed >= max_remove:
                break
        else:
            log[-1]["decision"] = "reject"
            l -= 1
    return Plan(
        method="laco",
        num_layers=L,
        merges=merges,
        params={"threshold": threshold, "operator": operator, "merge_layers": merge_layers,
                "interval": interval, "lowest": lowest, "highest": highest, "max_remove": max_remove},
        log=log,
    )


def searcher(options: LaCoOptions, num_layers: int) -> Search:
    """The search ``run_threshold_search`` drives, with these options, on a model of ``num_layers`` (checked
    against it by :meth:`LaCoOptions.check_depth` before planning)."""
    highest = num_layers if options.highest is None else options.highest

    def search(engine, t, **kw):
        return laco_search(engine, t, operator=options.operator, merge_layers=options.merge_layers,
                           interval=options.interval, lowest=options.lowest, highest=highest, **kw)
    return search


@register("laco", "layer collapse: merge C layers into one while similarity stays above T", LaCoOptions,
          reference="LaCo, arXiv 2402.11187")
def plan(backend: Backend, calibration: Calibration, target: Target | None, options: LaCoOptions,
         run: RunContext) -> Plan:
    search = searcher(options, backend.num_layers)
    with SimilarityEngine(backend, calibration, batch_size=run.batch_size, progress=run.progress) as engine:
        return run_threshold_search("laco", search, engine, calibration, target, options, run.progress)
