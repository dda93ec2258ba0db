"""Checks every number and path a user gives goes through, wherever it enters (a flag, a method option, the API).

``nan`` and ``inf`` parse as floats and slip through every range check written as ``x <= 0`` (each comparison
with ``nan`` is false), so a ridge of ``nan`` would fit NaN weights and save them. One rule, applied where
values enter: a float option is finite. The same holds for weights (a NaN in one input tensor makes every score
NaN) and for what a command reports (:func:`non_finite_fields`). A path with a name longer than the file system allows fails in
whatever opens it first, deep inside; one rule refuses it where the path enters.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

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


def name_limit(path: Path) -> int:
    """The longest file name (in bytes) the file system holding ``path`` (or its nearest existing ancestor)
    accepts."""
    for directory in (path, *path.parents):
        try:
            return os.pathconf(directory, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def check_name_lengths(path: str | Path, option: str) -> None:
    """Refuse a path with a component longer than the file system allows, before anything touches it (the
    system's error would come from deep inside whatever opened it first)."""
    path = Path(path).expanduser()
    limit = name_limit(path.absolute())
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise InputError(f"{option} {part[:16]}...{part[-8:]}: that name is {size} bytes, and the file system "
                             f"allows at most {limit} bytes per name; choose a shorter one")


def non_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating tensors holding NaN or an infinity."""
    return [name for name, tensor in tensors
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())]


def named_list(names: list[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``: a few names of a long list, for a one-line message."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def require_finite_result(value: Any, what: str) -> None:
    """Refuse to report (print, save as a plan, write as JSON) a result holding NaN or an infinity: a number
    that means nothing is an error, not an answer (exit code 2, never 0)."""
    bad = non_finite_fields(value)
    if bad:
        raise InputError(f"{what} is not a finite number ({named_list(bad)} NaN or infinite): the model computes "
                         "non-finite values on this input; check its weights and config.json")


def non_finite_fields(value: Any, where: str = "") -> list[str]:
    """The dotted names of every NaN or infinite number in a result (a dict, list or number)."""
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in non_finite_fields(item, f"{where}.{key}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [bad for i, item in enumerate(value) for bad in non_finite_fields(item, f"{where}[{i}]")]
    return [where or "the value"] if isinstance(value, float) and not math.isfinite(value) else []
