"""JSON round trips for the dataclasses depthprune saves beside a checkpoint (depth and width plans).

A record file that is not JSON, lacks a required field, or has a field of the
wrong kind is an input error naming the file, never a ``TypeError`` from deep
inside a constructor.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .checks import check_name_lengths
from .errors import InputError

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """Mixin for dataclasses: ``to_dict``/``to_json``/``from_dict``/``load``.

    Subclasses set ``FILE`` (the name used inside a checkpoint directory),
    ``KIND`` (how messages call the record) and ``ERROR`` (the exception type
    raised for a bad record), and may add computed keys in ``_derived``.
    """

    FILE: ClassVar[str]
    KIND: ClassVar[str]
    ERROR: ClassVar[type[Exception]] = InputError

    def _derived(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self._derived()}  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls: type[R], data: Any, *, where: str = "the data") -> R:
        if not isinstance(data, dict):
            raise cls.ERROR(f"{where} is not a {cls.KIND}: expected a JSON object")
        declared = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        required = [name for name, f in declared.items()
                    if f.default is MISSING and f.default_factory is MISSING and f.init]
        missing = [name for name in required if name not in data]
        if missing:
            raise cls.ERROR(f"{where} is not a complete {cls.KIND}: missing {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in declared and declared[k].init})
        except (TypeError, KeyError, AttributeError) as err:
            raise cls.ERROR(f"{where} is not a valid {cls.KIND}: {err}") from err

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a record from its file, or from ``FILE`` inside a directory."""
        path = Path(path).expanduser()
        check_name_lengths(path, f"the {cls.KIND} path")
        if path.is_dir():
            path = path / cls.FILE
        if not path.is_file():
            raise cls.ERROR(f"no {cls.KIND} file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise cls.ERROR(f"{path} is not a readable {cls.KIND} (JSON): {err}") from err
        return cls.from_dict(data, where=str(path))
