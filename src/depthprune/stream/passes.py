"""Layer-major passes: every calibration batch through layer i, then layer i is freed and layer i+1 loaded.

The in-memory decoder loop is batch-major (one batch through every layer).
Streaming turns it around so each layer is read from disk once; the states
between layers wait in a :class:`StateStore`. The batches, their order and
every operation on them are those of the in-memory loop, so statistics come
out bit for bit the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.forward import Batch, batches_of
from .model import StreamedModel
from .states import StateStore, available_memory, format_size, state_bytes

OnInput = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
OnLayer = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class MemoryPlan:
    """What a streamed pass holds at its peak, against the budget it was given."""

    layer: int
    outside: int
    states: int
    extra: int
    budget: int
    budget_from: str

    @property
    def needed(self) -> int:
        return self.layer + self.outside + self.states + self.extra

    @property
    def spill(self) -> bool:
        return self.needed > self.budget

    def describe(self) -> str:
        parts = (f"one layer {format_size(self.layer)} + embeddings {format_size(self.outside)} + calibration "
                 f"states {format_size(self.states)}" + (f" + {format_size(self.extra)} more" if self.extra else ""))
        if self.spill:
            return (f"streaming: {parts} exceed {self.budget_from} ({format_size(self.budget)}): the states "
                    "are spilled to disk")
        return f"streaming: {parts} fit {self.budget_from} ({format_size(self.budget)}); states kept in memory"


def memory_plan(sm: StreamedModel, num_windows: int, seq_len: int, *, max_memory: int | None = None,
                extra: int = 0, head: bool = False) -> MemoryPlan:
    """The peak of a streamed pass over ``num_windows`` windows (``extra``: what else it keeps, e.g. CKA
    kernels), against ``max_memory`` or the memory available now."""
    hidden = int(getattr(sm.config, "hidden_size", 0) or getattr(sm.config, "n_embd"))
    states = state_bytes(num_windows, seq_len, hidden, sm.dtype)
    budget, source = (max_memory, "--max-memory") if max_memory else (available_memory(), "available memory")
    return MemoryPlan(sm.layer_bytes, sm.outside_bytes(head), states, extra, budget, source)


def open_store(plan: MemoryPlan, scratch: Path | None) -> StateStore:
    """In memory when the plan fits its budget, else spilled to a temporary directory inside ``scratch``."""
    return StateStore.spilling(scratch) if plan.spill else StateStore()


def states_store(sm: StreamedModel, data: Calibration, max_memory: int | None, scratch: Path | None, *,
                 sets: int = 1, extra: int = 0, head: bool = False, report=None) -> StateStore:
    """The store for ``sets`` copies of ``data``'s states (one per search candidate, say), in memory or spilled
    as the memory plan decides; ``report(message)`` is told which."""
    plan = memory_plan(sm, data.num_windows * sets, int(data.input_ids.shape[1]), max_memory=max_memory,
                       extra=extra, head=head)
    if report is not None:
        report(plan.describe())
    return open_store(plan, scratch)


def walk_layers(
    sm: StreamedModel,
    data: Calibration | Sequence[Batch],
    store: StateStore,
    *,
    batch_size: int | None = None,
    on_input: OnInput | None = None,
    on_layer: OnLayer | None = None,
    progress: bool = False,
    desc: str = "layers",
) -> list[Batch]:
    """Run every batch through every layer, one layer in memory at a time; the last states stay in ``store``.

    ``on_input(b, ids, mask, h0)`` sees each batch's state entering layer 0; ``on_layer(i, b, mask, h_in,
    h_out)`` each layer's input and output. Returns the batches (ids, mask on the device) in order.
    """
    batches = [(ids.to(sm.device), mask.to(sm.device)) for ids, mask in batches_of(data, batch_size)]
    with torch.inference_mode(), sm.outside():
        for b, (ids, mask) in enumerate(batches):
            h0, _ = sm.layer_calls(ids, mask, 0)
            if on_input is not None:
                on_input(b, ids, mask, h0)
            store.put(b, h0)
        for i in tqdm(range(sm.num_layers), desc=desc, disable=not progress, unit="layer"):
            with sm.layer(i) as layer:
                for b, (ids, mask) in enumerate(batches):
                    _, calls = sm.layer_calls(ids, mask, i)
                    h_in = store.get(b).to(sm.device)
                    h_out = calls[i](layer, h_in)
                    if on_layer is not None:
                        on_layer(i, b, mask, h_in, h_out)
                    store.put(b, h_out)
    return batches
