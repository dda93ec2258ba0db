"""Registry of depth-pruning methods. Each takes a model, calibration windows,
an optional depth target and its own options, and returns a :class:`Plan`.

Methods only decide; :func:`depthprune.apply_plan` changes weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from tqdm.auto import tqdm

from ..analysis.stats import layer_statistics
from ..data.calibration import Calibration
from ..engine.search import SimilarityEngine
from ..models.arch import num_layers
from ..plan import Plan, PlanError, layers_to_remove
from ..surgery.merge import check_operator
from . import laco, slm
from .angular import plan_angular
from .shortgpt import plan_shortgpt
from .target import threshold_for_target


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


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise PlanError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    return threshold


def _threshold_search(name: str, search, model: nn.Module, calibration: Calibration, target: Target | None,
                      threshold: float | None, default_threshold: float, operator: str,
                      batch_size: int | None, progress: bool) -> Plan:
    """Shared driver: build the engine once, then run at T or bisect T for a depth target."""
    check_operator(operator)
    if target is not None and target.given and threshold is not None:
        raise PlanError(f"--method {name} takes either --threshold or a depth target, not both")
    if threshold is not None:
        check_threshold(threshold)
    n = target.n_remove(num_layers(model)) if target is not None and target.given else None
    engine = SimilarityEngine(model, calibration, batch_size=batch_size)
    memo: dict = {}
    with tqdm(desc=f"{name} windows", unit="window", disable=not progress) as bar:
        if n is None:
            plan = search(engine, threshold if threshold is not None else default_threshold, memo=memo,
                          progress=bar)
        else:
            plan = threshold_for_target(
                lambda t, budget: search(engine, t, max_remove=budget, memo=memo, progress=bar), n
            )
            plan.params["target"] = target.to_dict()
    plan.calibration = calibration.to_dict()
    plan.params["candidates_evaluated"] = engine.evaluations
    return plan


@register("slm", "sliding-window layer merging, top down, threshold T on final-state similarity (SLM)")
def _slm(model: nn.Module, calibration: Calibration, target: Target | None = None, *,
         threshold: float | None = None, operator: str | None = None, final_window: str = "commit",
         engine_batch_size: int | None = None, progress: bool = True, **_: Any) -> Plan:
    operator = operator or slm.DEFAULT_OPERATOR

    def search(engine, t, **kw):
        return slm.slm_search(engine, t, operator=operator, final_window=final_window, **kw)

    return _threshold_search("slm", search, model, calibration, target, threshold, slm.DEFAULT_THRESHOLD,
                             operator, engine_batch_size, progress)


@register("laco", "layer collapse: merge C layers into one when similarity stays above T (LaCo)")
def _laco(model: nn.Module, calibration: Calibration, target: Target | None = None, *,
          threshold: float | None = None, operator: str | None = None,
          merge_layers: int = laco.DEFAULT_MERGE_LAYERS, interval: int = laco.DEFAULT_INTERVAL,
          lowest: int = 1, highest: int | None = None, engine_batch_size: int | None = None,
          progress: bool = True, **_: Any) -> Plan:
    operator = operator or laco.DEFAULT_OPERATOR
    laco.check_laco_options(num_layers(model), merge_layers, interval, lowest,
                            num_layers(model) if highest is None else highest)

    def search(engine, t, **kw):
        return laco.laco_search(engine, t, operator=operator, merge_layers=merge_layers, interval=interval,
                                lowest=lowest, highest=highest, **kw)

    return _threshold_search("laco", search, model, calibration, target, threshold, laco.DEFAULT_THRESHOLD,
                             operator, engine_batch_size, progress)


def make_plan(method: str, model: nn.Module, calibration: Calibration, target: Target | None = None,
              **options: Any) -> Plan:
    """Run a registered method; unknown names get an error listing the known ones."""
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return METHODS[method].fn(model, calibration, target, **options)
