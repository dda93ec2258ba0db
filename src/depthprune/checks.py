"""Checks every number a user gives goes through, wherever it enters (a flag, a method option, the API).

``nan`` and ``inf`` parse as floats and slip through every range check written as ``x <= 0`` (each comparison
with ``nan`` is false), so a ridge of ``nan`` would fit NaN weights and save them. One rule, applied where
values enter: a float option is finite.
"""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any, Callable

from .errors import InputError


def flag_of(name: str) -> str:
    """The command-line spelling of an option name (``max_steps`` -> ``--max-steps``)."""
    return "--" + name.replace("_", "-")


def require_finite(value: Any, option: str) -> None:
    """Refuse ``nan`` and ``inf`` (ints, None and non-numbers pass: other checks judge those)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, got {value}")


def require_finite_fields(record: Any, flag: Callable[[str], str] = flag_of) -> None:
    """Every float field of a dataclass is finite; the error names the field as ``flag(name)``."""
    if not is_dataclass(record):
        raise TypeError(f"{type(record).__name__} is not a dataclass")
    for f in fields(record):
        require_finite(getattr(record, f.name), flag(f.name))
