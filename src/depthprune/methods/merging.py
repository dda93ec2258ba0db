"""What SLM and LaCo share: a similarity threshold T *or* a depth target, a merge operator, and one
driver that builds the similarity engine once and runs the search at T or bisects T for the target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..engine.search import SimilarityEngine
from ..plan import Plan, PlanError
from ..operators import OPERATORS
from .registry import MethodOptions, option
from .target import Target, given, threshold_for_target


@dataclass
class ThresholdOptions(MethodOptions):
    threshold: float | None = option(
        None, "similarity threshold T in (0, 1); give T or a depth target (then T is found by bisection)")
    operator: str = option("reference", "merge operator", choices=OPERATORS)

    #: T used when neither a threshold nor a depth target is given.
    DEFAULT_THRESHOLD = 0.5

    def __init_subclass__(cls, **kwargs: object) -> None:
        """A method's ``--threshold`` help names its own default T."""
        super().__init_subclass__(**kwargs)
        cls.HELP = {**cls.HELP, "threshold": f"similarity threshold T in (0, 1) ({cls.DEFAULT_THRESHOLD} when no "
                    "depth target is given); with a depth target T is found by bisection instead"}

    def validate(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise PlanError(f"--threshold must be between 0 and 1 (exclusive), got {self.threshold}")

    def check_target(self, method: str, target: Target | None) -> None:
        if given(target) and self.threshold is not None:
            raise PlanError(f"--method {method} takes either --threshold or a depth target, not both")


Search = Callable[..., Plan]


def run_threshold_search(name: str, search: Search, engine: SimilarityEngine, calibration: Calibration,
                         target: Target | None, options: ThresholdOptions, progress: bool = True) -> Plan:
    """``search(engine, T, max_remove=, memo=, progress=)`` at T, or under bisection for a target."""
    n = target.n_remove(engine.num_layers) if given(target) else None
    memo: dict = {}
    with tqdm(desc=f"{name} windows", unit="window", disable=not progress) as bar:
        if n is None:
            t = options.threshold if options.threshold is not None else options.DEFAULT_THRESHOLD
            plan = search(engine, t, memo=memo, progress=bar)
        else:
            plan = threshold_for_target(
                lambda t, budget: search(engine, t, max_remove=budget, memo=memo, progress=bar), n
            )
    plan.params["candidates_evaluated"] = engine.evaluations
    return plan
