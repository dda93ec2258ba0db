"""SLM: Sliding Layer Merging (Ding et al., arXiv 2502.19159).

Slide a window from the top of the model down; grow it while the model with
the window merged stays similar to the *original* (final-hidden-state cosine
> T); when it stops passing, commit the last passing window and start a new
one just below it. The last layer is never merged::

    high = L-2; low = high-1
    while low >= 0:
        if sim(original, current with low..high merged) > T:  low -= 1          # grow down
        elif low+1 != high:  commit low+1..high; high = low; low = high-1       # merge last passing
        else:                high -= 1; low -= 1                                 # slide

Edge case: the released code never commits a window that still passes when the
loop ends (it reached layer 0). depthprune commits it by default
(``final_window="commit"``: it passed the same test as every other window);
``final_window="skip"`` reproduces the released code.

With a layer budget (``max_remove``) a passing window is committed as soon as
it removes exactly the layers still wanted, and the search stops.
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

DEFAULT_THRESHOLD = 0.72
DEFAULT_OPERATOR = "reference"
FINAL_WINDOW = ("commit", "skip")


@dataclass
class SLMOptions(ThresholdOptions):
    operator: str = option(DEFAULT_OPERATOR, "merge operator (reference = the released code)",
                           choices=OPERATORS)
    final_window: str = option("commit", "a window still passing when the loop reaches layer 0: commit it, "
                               "or skip it as the released code does", choices=FINAL_WINDOW)

    DEFAULT_THRESHOLD = DEFAULT_THRESHOLD


def slm_search(
    engine: SimilarityEngine,
    threshold: float,
    *,
    operator: str = DEFAULT_OPERATOR,
    max_remove: int | None = None,
    final_window: str = "commit",
    memo: dict | None = None,
    progress: Any = None,
) -> Plan:
    """One SLM pass at ``threshold``; every window tried is logged with its similarity and decision."""
    if final_window not in FINAL_WINDOW:
        raise PlanError(f"final_window must be one of {FINAL_WINDOW}, got {final_window!r}")
    memo = {} if memo is None else memo
    stack = CurrentStack(engine, operator)
    merges: list[Merge] = []
    log: list[dict[str, Any]] = []
    L = engine.num_layers

    def commit(low: int, high: int, why: str) -> None:
        stack.commit(low, high)
        merges.append(Merge(low, high, operator))
        log[-1]["decision"] = why

    high, low = L - 2, L - 3
    pending = False
    while low >= 0:
        key = stack.candidate_key(low, high)
        if key not in memo:
            memo[key] = stack.similarity(low, high)
        sim = memo[key]
        log.append({"low": low, "high": high, "similarity": sim})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(window=f"{low}-{high}", sim=f"{sim:.4f}", merged=stack.removed)
        passed = sim > threshold
        if passed and max_remove is not None and high - low >= max_remove - stack.removed:
            commit(low, high, f"pass: commit {low}..{high} (layer budget reached)")
            pending = False
            break
        if passed:
            log[-1]["decision"] = "pass: grow window"
            low -= 1
            pending = True
        elif low + 1 != high:
            log[-1]["decision"] = "fail"
            commit(low + 1, high, f"fail: commit {low + 1}..{high}")
            high, low = low, low - 1
            pending = False
        else:
            log[-1]["decision"] = "fail: slide"
            high, low = high - 1, low - 1
            pending = False
    if pending:
        if final_window == "commit":
            commit(0, high, f"loop ended with window 0..{high} passing: commit")
        else:
            log[-1]["decision"] += " (loop ended; window not committed, as in the released code)"
    return Plan(
        method="slm",
        num_layers=L,
        merges=merges,
        params={"threshold": threshold, "operator": operator, "final_window": final_window,
                "max_remove": max_remove},
        log=log,
    )


def searcher(options: SLMOptions) -> Search:
    """The search ``run_threshold_search`` drives, with these options."""
    def search(engine, t, **kw):
        return slm_search(engine, t, operator=options.operator, final_window=options.final_window, **kw)
    return search


@register("slm", "sliding-window layer merging, top down, threshold T on final-state similarity", SLMOptions,
          reference="SLM, arXiv 2502.19159")
def plan(backend: Backend, calibration: Calibration, target: Target | None, options: SLMOptions,
         run: RunContext) -> Plan:
    with SimilarityEngine(backend, calibration, batch_size=run.batch_size, progress=run.progress) as engine:
        return run_threshold_search("slm", searcher(options), engine, calibration, target, options, run.progress)
