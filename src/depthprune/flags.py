"""Settings declared once, on the dataclass field: default, one line of help, the values it accepts, and the
flag that sets it.

Method options (:class:`depthprune.methods.MethodOptions`) and healing settings
(:class:`depthprune.heal.HealConfig`) declare their fields with :func:`option`;
the command line builds its flags and ``--help`` from :func:`declared_options`,
so a setting's name, default and meaning are written in one place. A field
declared without :func:`option` is a setting of the API only.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Sequence


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, flag: str | None = None,
           inverted: bool = False) -> Any:
    """A setting: its default, one line of help, and optionally the values it accepts; ``flag`` when the flag's
    name is not the field's (``--rank`` sets ``r``), ``inverted`` for a true/false flag that means the field's
    opposite (``--live-teacher`` sets ``teacher_cache=False``)."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "flag": flag, "inverted": inverted})


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: type
    optional: bool
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    flag_name: str = ""
    inverted: bool = False

    def __post_init__(self) -> None:
        if not self.flag_name:
            object.__setattr__(self, "flag_name", self.name.replace("_", "-"))

    @property
    def flag(self) -> str:
        return "--" + self.flag_name

    @property
    def flag_default(self) -> Any:
        """The default as the flag states it (the opposite of the field's for an inverted flag)."""
        return (not self.default) if self.inverted else self.default

    def field_value(self, value: Any) -> Any:
        """The field's value for the flag's ``value``."""
        return (not value) if self.inverted else value

    def describe(self) -> str:
        default = "" if self.flag_default is None else f" [default: {self.flag_default}]"
        choices = f" (one of: {', '.join(map(str, self.choices))})" if self.choices else ""
        kind = "" if self.type is bool else " " + {str: "TEXT"}.get(self.type, self.type.__name__.upper())
        return f"{self.flag}{kind}: {self.help}{choices}{default}"


def _unwrap(hint: Any) -> tuple[type, bool]:
    """(base type, accepts None) of an annotation such as ``int | None``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _unwrap(args[0])[0], True
    if origin is Literal:
        return type(typing.get_args(hint)[0]), False
    return hint, False


def declared_options(cls: type, prefix: str = "") -> list[OptionInfo]:
    """The fields of dataclass ``cls`` declared with :func:`option`, in field order; ``prefix``: before each name
    (and the flag made from it) where ``cls`` is part of a larger record that names its fields so."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        base, optional = _unwrap(hints[f.name])
        default = None if f.default is MISSING else f.default
        out.append(OptionInfo(prefix + f.name, base, optional, default, f.metadata["help"], f.metadata.get("choices"),
                              f.metadata.get("flag") or "", f.metadata.get("inverted", False)))
    return out
