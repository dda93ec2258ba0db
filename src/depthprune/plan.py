"""A Plan says which layers to remove or merge, and why. Methods produce plans;
:mod:`depthprune.surgery` applies them. Plans are JSON, so they can be read,
diffed, saved beside the checkpoint and applied again to another copy of the model.

All layer indices are *original* indices (positions in the unpruned model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLAN_FILE = "depthprune_plan.json"


class PlanError(ValueError):
    pass


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


@dataclass
class Plan:
    method: str
    num_layers: int
    remove: list[int] = field(default_factory=list)
    merges: list[Merge] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    version: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.remove = sorted(int(i) for i in self.remove)
        self.merges = [m if isinstance(m, Merge) else Merge(**m) for m in self.merges]
        if self.version is None:
            from . import __version__

            self.version = __version__
        self.validate()

    def validate(self) -> None:
        removed: set[int] = set()
        for i in self.remove:
            if not 0 <= i < self.num_layers:
                raise PlanError(f"layer {i} is outside 0..{self.num_layers - 1}")
            if i in removed:
                raise PlanError(f"layer {i} is removed twice")
            removed.add(i)
        done: list[Merge] = []
        for m in self.merges:
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
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_layers_after"] = self.num_layers_after
        d["kept"] = self.kept
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"no plan file at {path}")
        return cls.from_dict(json.loads(path.read_text()))


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
