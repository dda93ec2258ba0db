"""A Plan is one decision: which layers to remove or merge, whether to compensate the gaps, and why.

Methods produce plans; :mod:`depthprune.surgery` applies them. Plans are JSON,
so they can be read, diffed, saved beside the checkpoint and applied again to
another copy of the model. A plan is what its method returned: what the jobs
around it add (the model it was applied to, the depth target, the calibration
windows, compensation fits, later stages) is kept in the
:class:`~depthprune.run_record.RunRecord` beside it.

All layer indices are *original* indices (positions in the unpruned model).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .errors import PlanError
from .fit_settings import Compensation
from .operators import check_operator
from .records import JsonRecord

PLAN_FILE = "depthprune_plan.json"


@dataclass(frozen=True)
class Merge:
    """Fold the layers still standing in ``low..high`` (inclusive) into one layer at ``low``.

    Merges apply in plan order. A later merge may contain an earlier one
    (LaCo can collapse an already-merged layer again); the earlier merge's
    result then takes part as a single layer, exactly as in LaCo's loop over
    the current model.
    """

    low: int
    high: int
    operator: str

    @property
    def window(self) -> range:
        return range(self.low, self.high + 1)


def _layer_index(value: Any, what: str) -> int:
    """A layer index or count exactly as written: ``13.7`` or ``true`` would silently become another layer."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # ints, numpy and torch integers; never floats, strings or bools
    except TypeError:
        raise PlanError(f"malformed plan: {what} holds {value!r}, not a whole layer number (plans give layers as "
                        "integers such as 3)") from None


def _merge(data: Any) -> Merge:
    if isinstance(data, Merge):
        data = vars(data)
    if not isinstance(data, dict) or not {"low", "high", "operator"} <= set(data):
        raise PlanError(f"malformed plan: merge {data!r} is not an object with low, high, operator")
    if not isinstance(data["operator"], str):
        raise PlanError(f"malformed plan: merge operator {data['operator']!r} is not a name")
    return Merge(_layer_index(data["low"], "a merge's low"), _layer_index(data["high"], "a merge's high"),
                 data["operator"])


@dataclass
class Plan(JsonRecord):
    FILE = PLAN_FILE
    KIND = "depthprune plan"
    ERROR = PlanError

    method: str
    num_layers: int
    remove: list[int] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    version: str | None = None
    compensation: Compensation | None = None

    def __post_init__(self) -> None:
        self.num_layers = _layer_index(self.num_layers, "num_layers")
        if any(isinstance(x, (str, bytes, dict)) or not hasattr(x, "__iter__") for x in (self.remove, self.merges)):
            raise PlanError("malformed plan: remove and merges must be lists (remove: layer indices; merges: "
                            "objects with low, high, operator)")
        self.remove = sorted(_layer_index(i, "remove") for i in self.remove)
        self.merges = [_merge(m) for m in self.merges]
        if self.compensation == {}:
            self.compensation = None  # as plans written before the settings were typed read it: no fit
        if isinstance(self.compensation, dict):
            try:
                self.compensation = Compensation.from_dict(self.compensation)
            except TypeError as err:
                raise PlanError(f"malformed plan: compensation: {err}") from None
        if self.version is None:
            self.version = __version__
        self.validate()

    def validate(self) -> None:
        if self.compensation is not None and not isinstance(self.compensation, Compensation):
            raise PlanError(f"malformed plan: compensation is {self.compensation!r}, not the fit's settings (an "
                            "object such as {\"fit\": \"linear\"}) or null")
        if self.num_layers < 1:
            raise PlanError(f"the plan's num_layers must be at least 1, got {self.num_layers}")
        removed: set[int] = set()
        for i in self.remove:
            if not 0 <= i < self.num_layers:
                raise PlanError(f"layer {i} is outside 0..{self.num_layers - 1}")
            if i in removed:
                raise PlanError(f"layer {i} is removed twice")
            removed.add(i)
        done: list[Merge] = []
        for m in self.merges:
            check_operator(m.operator)
            if not 0 <= m.low < m.high < self.num_layers:
                raise PlanError(f"merge {m.low}..{m.high} is not a window inside 0..{self.num_layers - 1}")
            if removed.intersection(m.window):
                raise PlanError(f"merge {m.low}..{m.high} overlaps removed layers {sorted(removed.intersection(m.window))}")
            for prev in done:
                inside = prev.low >= m.low and prev.high <= m.high
                apart = prev.high < m.low or prev.low > m.high
                if not (inside or apart):
                    raise PlanError(
                        f"merge {m.low}..{m.high} cuts through the earlier merge {prev.low}..{prev.high}"
                    )
                if inside and prev.low == m.low and prev.high == m.high:
                    raise PlanError(f"merge {m.low}..{m.high} is given twice")
            done.append(m)
        if self.num_layers_after < 1:
            raise PlanError(f"the plan removes all {self.num_layers} layers; keep at least one")

    def merge_members(self, index: int) -> list[int]:
        """Original indices of the layers standing in merge ``index``'s window when it applies."""
        gone = set(self.remove)
        for m in self.merges[:index]:
            gone.update(i for i in m.window if i != m.low)
        return [i for i in self.merges[index].window if i not in gone]

    @property
    def dropped(self) -> list[int]:
        """Original layers that no longer exist as their own layer (removed or merged away)."""
        gone = set(self.remove)
        for m in self.merges:
            gone.update(i for i in m.window if i != m.low)
        return sorted(gone)

    @property
    def kept(self) -> list[int]:
        gone = set(self.dropped)
        return [i for i in range(self.num_layers) if i not in gone]

    @property
    def num_layers_after(self) -> int:
        return self.num_layers - len(self.dropped)

    def summary(self) -> str:
        parts = [f"{self.method}: {self.num_layers} -> {self.num_layers_after} layers"]
        if self.remove:
            parts.append(f"remove {self.remove}")
        for m in self.merges:
            parts.append(f"merge {m.low}..{m.high} ({m.operator})")
        if self.compensation:
            parts.append(f"compensate ({self.compensation.fit})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The compensation flat, as plans have always recorded it (:meth:`Compensation.to_dict`)."""
        data = super().to_dict()
        data["compensation"] = self.compensation.to_dict() if self.compensation is not None else None
        return data

    def _derived(self) -> dict[str, Any]:
        return {"num_layers_after": self.num_layers_after, "kept": self.kept}

    def check_model_depth(self, num_layers: int, what: str = "the model") -> None:
        """Refuse to use a plan on a model of another depth (its indices would point at other layers)."""
        if num_layers != self.num_layers:
            raise PlanError(
                f"the plan was made for a model of {self.num_layers} layers but {what} has {num_layers}; "
                "use the plan with the model it was made for"
            )
