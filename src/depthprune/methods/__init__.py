"""Depth-pruning methods. Each module declares its options and registers a ``plan`` function that returns a
:class:`~depthprune.plan.Plan`; methods only decide, :func:`depthprune.apply_plan` changes weights.

Importing this package registers every built-in method (the imports below).
"""

from __future__ import annotations

# Each module registers itself; the order here is the order `depthprune methods` lists them in.
from . import shortgpt  # noqa: F401  isort: skip
from . import angular  # noqa: F401  isort: skip
from . import sleb  # noqa: F401  isort: skip
from . import slm  # noqa: F401  isort: skip
from . import laco  # noqa: F401  isort: skip
from . import auto  # noqa: F401  isort: skip
from .registry import (
    METHODS,
    Method,
    MethodOptions,
    RunContext,
    build_options,
    check_request,
    describe_methods,
    get_method,
    make_plan,
    option,
    parse_flags,
    register,
)
from .target import Target, layers_to_remove

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "RunContext",
    "Target",
    "build_options",
    "check_request",
    "describe_methods",
    "get_method",
    "layers_to_remove",
    "make_plan",
    "option",
    "parse_flags",
    "register",
]
