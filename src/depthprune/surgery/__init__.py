"""Apply a :class:`~depthprune.plan.Plan` to a model: merge, remove, renumber, fix the config."""

from ..operators import OPERATORS
from .apply import Applied, apply, apply_plan, prune
from .inplace import surgery

__all__ = ["OPERATORS", "Applied", "apply", "apply_plan", "prune", "surgery"]
