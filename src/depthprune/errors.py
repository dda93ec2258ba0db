"""One base class for every error caused by input.

``depthprune`` on the command line turns a :class:`DepthpruneError` into one
line and exit code 2; any other exception is a bug and keeps its traceback.
Subclasses also derive from the builtin a Python caller would expect
(``ValueError``, ``FileNotFoundError``), so API users can catch either.
"""

from __future__ import annotations


class DepthpruneError(Exception):
    """Something the user can fix by changing what they asked for."""


class InputError(DepthpruneError, ValueError):
    """A bad option value or a bad combination of options."""


class MissingInputError(DepthpruneError, FileNotFoundError):
    """A file or directory the command needs does not exist or cannot be read."""


class MissingPackageError(DepthpruneError, ModuleNotFoundError):
    """An optional package is needed for what was asked (the message says how to install it)."""


class CheckpointError(DepthpruneError, ValueError):
    """A checkpoint about to be committed is not what it claims (non-finite weights, a wrong depth)."""


class ModelLoadError(DepthpruneError, OSError):
    """The model source exists (or names a hub id) but cannot be loaded."""


class PlanError(InputError):
    """A plan that cannot be made or applied as asked (a depth, an option, a malformed plan file)."""
