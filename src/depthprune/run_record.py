"""The run record: how a checkpoint was made, saved beside its plan.

A :class:`~depthprune.plan.Plan` is one decision: which layers to remove or
merge, whether to compensate the gaps, and why (scores, the search's log).
Everything else the jobs that made a checkpoint know goes here: the model the
plan was applied to, and every stage since, in order (depth with its target,
calibration windows and compensation fits; width pruning; healing), each with
what it used and measured. Each job carries its input's record over and
extends it, so a healed checkpoint still says which dense model it came from.

Checkpoints written before the record existed kept the source model and later
stages inside their plan file; :meth:`RunRecord.of_checkpoint` reads those too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import InputError
from .plan import PLAN_FILE
from .records import JsonRecord

RUN_FILE = "depthprune_run.json"


class RunRecordError(InputError):
    pass


@dataclass
class RunRecord(JsonRecord):
    FILE = RUN_FILE
    KIND = "depthprune run record"
    ERROR = RunRecordError

    source: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    version: str | None = None

    def __post_init__(self) -> None:
        if self.version is None:
            self.version = __version__
        if not isinstance(self.stages, list) or not all(isinstance(s, dict) for s in self.stages):
            raise RunRecordError("a run record's stages must be a list of objects")

    def names(self) -> list[str]:
        """Every stage's name, in order (``depth``, ``width``, ``heal``)."""
        return [str(s.get("stage", "?")) for s in self.stages]

    def extended(self, source: str | None, stages: list[dict[str, Any]]) -> "RunRecord":
        """This record with a job's ``stages`` appended; a job that planned depth names its input as the
        source (the model its plan applies to)."""
        depth = any(s.get("stage") == "depth" for s in stages)
        return RunRecord(source=source if depth or self.source is None else self.source,
                         stages=[*self.stages, *stages])

    @classmethod
    def of_checkpoint(cls, where: str | Path) -> "RunRecord | None":
        """The record beside a checkpoint (``where``: its directory or its plan file), or one rebuilt from an
        older checkpoint's plan file; None when the checkpoint has neither (a model depthprune did not make)."""
        path = Path(where).expanduser()
        directory = path if path.is_dir() else path.parent
        if (directory / RUN_FILE).is_file():
            return cls.load(directory / RUN_FILE)
        plan_file = path if path.is_file() else directory / PLAN_FILE
        try:
            legacy = json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(legacy, dict) or not ({"model", "stages"} & set(legacy)):
            return None
        depth = {"stage": "depth", "method": legacy.get("method"), "calibration": legacy.get("calibration")}
        stages = [s for s in legacy.get("stages") or [] if isinstance(s, dict)]
        return cls(source=legacy.get("model"), stages=[depth, *stages], version=legacy.get("version"))
