"""Apply a :class:`~depthprune.plan.Plan` to a model: merge, remove, renumber, fix the config."""

from .apply import apply_plan, surgery
from .merge import OPERATORS

__all__ = ["OPERATORS", "apply_plan", "surgery"]
