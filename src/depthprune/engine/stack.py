"""The "current model" of a merge search, as a list of layers over original indices.

Each entry stands for the original layers ``low..high`` (one original layer,
or a merged window). Searches edit this list, never the model; the engine
evaluates ``[merged window] + entries above it`` on cached states.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .merged import MergedLayer
from .search import SimilarityEngine


@dataclass(frozen=True)
class Entry:
    low: int
    high: int
    module: nn.Module

    @property
    def key(self) -> tuple[int, int]:
        return (self.low, self.high)


class CurrentStack:
    def __init__(self, engine: SimilarityEngine, operator: str):
        self.engine = engine
        self.operator = operator
        self.entries = [Entry(i, i, layer) for i, layer in enumerate(engine.layers)]
        self.removed = 0

    def __len__(self) -> int:
        return len(self.entries)

    def merged(self, first: int, last: int) -> Entry:
        """Entries ``first..last`` (current positions) folded into one (not yet committed)."""
        members = self.entries[first : last + 1]
        module = MergedLayer([e.module for e in members], self.operator, self.engine.spec)
        return Entry(members[0].low, members[-1].high, module)

    def candidate_key(self, first: int, last: int) -> tuple:
        """Identifies a candidate fully: the window plus everything above it."""
        return (self.operator, self.entries[first].low, self.entries[last].high,
                tuple(e.key for e in self.entries[last + 1 :]))

    def similarity(self, first: int, last: int) -> float:
        window = self.merged(first, last)
        stack = [window] + self.entries[last + 1 :]
        return self.engine.similarity(window.low, [e.module for e in stack])

    def commit(self, first: int, last: int) -> Entry:
        window = self.merged(first, last)
        self.removed += last - first
        self.entries[first : last + 1] = [window]
        return window
