"""Layer-major passes over a backend: every batch of a group through layer i, then layer i+1.

Two shapes of pass, each written once for both backends:

* :func:`walk_layers` runs the model's own stack and lets observers watch every
  layer's input and output (layer statistics, CKA, perplexity). Batches go
  through in the groups the backend chooses (one at a time in memory, where
  memory is the cost; all together when streamed, where reading a layer is), and
  every operation on a batch is the one the model's own forward does, so the
  numbers are the same either way.
* :class:`Walker` runs *candidate* stacks (a search's candidates, a pruned plan,
  a compensated plan) from cached states: each :class:`Stack` is a list of
  layer modules (original layers, merged windows, patched layers) standing for
  original layers in order, started from stored states or forked from another
  stack during the same walk. All stacks advance together, ordered by the
  original layer each module starts at, so a streamed model reads each layer
  once per walk however many candidates use it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.forward import Batch
from .base import Backend, originals
from .states import StateStore

OnInput = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
OnLayer = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
OnOutput = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Meter:
    """Counts work as layer-windows (one decoder layer run on one window), the unit every pass and walk is made
    of, so a long job made of many searches can tell how much of its estimated total is done."""

    def __init__(self, on_add: Callable[[int], None] | None = None) -> None:
        self.done = 0
        self.on_add = on_add

    def add(self, units: float) -> None:
        self.done += units
        if self.on_add is not None:
            self.on_add(units)


_METER: ContextVar[Meter | None] = ContextVar("depthprune_meter", default=None)


@contextmanager
def metered(meter: Meter) -> Iterator[Meter]:
    """Count every layer run of the passes and walks inside the block on ``meter``."""
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def count_work(units: float) -> None:
    """Report ``units`` layer-windows of work to the meter of the enclosing :func:`metered` block, if any."""
    meter = _METER.get()
    if meter is not None:
        meter.add(units)


def _windows(batches: Sequence[Batch]) -> tuple[int, int]:
    return sum(int(ids.shape[0]) for ids, _ in batches), int(batches[0][0].shape[1]) if batches else 0


@torch.inference_mode()
def walk_layers(
    backend: Backend,
    batches: Sequence[Batch],
    *,
    on_input: OnInput | None = None,
    on_layer: OnLayer | None = None,
    on_output: OnOutput | None = None,
    head: bool = False,
    extra: int = 0,
    progress: bool = False,
    desc: str = "layers",
) -> list[Batch]:
    """Run every batch through every layer of ``backend``'s stack.

    ``on_input(b, ids, mask, h0)`` sees each batch's state entering layer 0, ``on_layer(i, b, mask, h_in,
    h_out)`` each layer's input and output, ``on_output(b, ids, mask, h_last)`` each batch's last-layer output
    (before the final norm) with the parts outside the layers in place (the LM head too with ``head``).
    ``extra``: bytes the observers keep, for the memory plan. Returns the batches on the backend's device.
    """
    batches = backend.to_device(batches)
    groups = backend.batch_groups(len(batches))
    with tqdm(total=len(groups) * backend.num_layers, desc=desc, disable=not progress, unit="layer") as bar:
        for group in groups:
            chosen = [batches[b] for b in group]
            windows, seq_len = _windows(chosen)
            with backend.state_store(windows, seq_len, extra=extra, head=head) as store:
                entering, calls = backend.record_calls(chosen)
                for k, b in enumerate(group):
                    if on_input is not None:
                        on_input(b, *chosen[k], entering[k])
                    store.put(b, entering[k])
                for i in range(backend.num_layers):
                    with backend.layer(i) as layer:
                        for k, b in enumerate(group):
                            h_in = store.get(b).to(backend.device)
                            h_out = calls[k][i](layer, h_in)
                            if on_layer is not None:
                                on_layer(i, b, chosen[k][1], h_in, h_out)
                            store.put(b, h_out)
                    count_work(windows)
                    bar.update(1)
                if on_output is not None:
                    with backend.outside(head=head):
                        for k, b in enumerate(group):
                            on_output(b, *chosen[k], store.get(b).to(backend.device))
    return batches


@dataclass
class Stack:
    """A candidate stack: ``modules`` run in order after its starting states.

    It starts from ``start`` (a state key kept in the walker's store: ``"input"`` is the state entering layer 0,
    ``("enter", key, p)`` a state another stack kept entering its position p), or, with ``fork=(key, p)``, from
    stack ``key``'s state entering its position p, taken while that stack runs in the same walk.
    """

    modules: Sequence[nn.Module]
    start: Hashable = "input"
    fork: tuple[Hashable, int] | None = None


class Walker:
    """Candidate stacks run on fixed batches from cached states, all advancing layer-major (see the module).

    Holds the batches (on the backend's device), every layer's recorded call per batch, and a state store
    sized for ``sets`` sets of states. A stack's state after :meth:`run` is in the store under ``(key, b)``.
    Close it (or use it as a context manager) to free spilled states.
    """

    def __init__(self, backend: Backend, batches: Sequence[Batch], *, sets: int = 2, head: bool = False,
                 progress: bool = False) -> None:
        self.backend = backend
        self.batches = backend.to_device(batches)
        self.progress = progress
        windows, seq_len = _windows(self.batches)
        self.windows = windows
        self.store: StateStore = backend.state_store(windows, seq_len, sets=sets, head=head)
        try:
            entering, self.calls = backend.record_calls(self.batches)
            for b, h0 in enumerate(entering):
                self.store.put(("input", b), h0)
        except BaseException:
            self.store.close()
            raise
        self.index = backend.layer_index()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Walker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def anchor(self, module: nn.Module) -> int:
        """The original layer a candidate module starts at; it runs with that layer's recorded call."""
        return originals(module, self.index)[0]

    def state(self, key: Hashable, b: int) -> torch.Tensor:
        return self.store.get((key, b)).to(self.backend.device)

    def copy(self, source: Hashable, target: Hashable) -> None:
        """Stack ``target`` starts from stack (or kept state) ``source``'s current states."""
        for b in range(len(self.batches)):
            self.store.put((target, b), self.store.get((source, b)))

    @torch.inference_mode()
    def run(self, stacks: dict[Hashable, Stack], *, keep: dict[Hashable, Iterable[int]] | None = None,
            progress: bool | None = None, desc: str = "candidates") -> None:
        """Run ``stacks``; each ends with its last module's output under ``(key, b)``. ``keep[key]`` lists
        positions whose entering states are kept under ``(("enter", key, p), b)`` (position
        ``len(modules)``: the stack's output)."""
        keep = {key: set(positions) for key, positions in (keep or {}).items()}
        anchors = {key: [self.anchor(m) for m in stack.modules] for key, stack in stacks.items()}
        done = {key: 0 for key in stacks}
        forks = {key: stack.fork for key, stack in stacks.items() if stack.fork is not None}
        for key, stack in stacks.items():
            if stack.fork is None and stack.start != key:
                self.copy(stack.start, key)
        steps = sorted({a for values in anchors.values() for a in values})
        shown = self.progress if progress is None else progress
        for a in tqdm(steps, desc=desc, disable=not shown, unit="layer"):
            for key, (source, position) in list(forks.items()):
                if done[source] == position and anchors[source][position] == a:
                    self.copy(source, key)
                    del forks[key]
            moving = [key for key in stacks if key not in forks and done[key] < len(anchors[key])
                      and anchors[key][done[key]] == a]
            for key in moving:
                if done[key] in keep.get(key, ()):
                    self.copy(key, ("enter", key, done[key]))
            modules = [stacks[key].modules[done[key]] for key in moving]
            with self.backend.materialized(modules):
                try:
                    for key, module in zip(moving, modules):
                        for b in range(len(self.batches)):
                            self.store.put((key, b), self.calls[b][a](module, self.state(key, b)))
                        done[key] += 1
                        count_work(self.windows)
                finally:
                    for module in modules:
                        release = getattr(module, "release", None)
                        if release is not None:
                            release()
        if forks:
            raise RuntimeError(f"stacks {sorted(map(str, forks))} fork from a position their source never reaches")
        for key, positions in keep.items():
            if len(anchors[key]) in positions:
                self.copy(key, ("enter", key, len(anchors[key])))

    @torch.inference_mode()
    def step(self, key: Hashable, module: nn.Module, on_batch: Callable[[int, torch.Tensor], None] | None = None,
             ) -> None:
        """Run one more ``module`` on stack ``key``'s states (``on_batch(b, h_out)`` after each batch; hooks the
        caller put on the module's parts see it run)."""
        a = self.anchor(module)
        with self.backend.materialized([module]):
            try:
                for b in range(len(self.batches)):
                    out = self.calls[b][a](module, self.state(key, b))
                    if on_batch is not None:
                        on_batch(b, out)
                    self.store.put((key, b), out)
                count_work(self.windows)
            finally:
                release = getattr(module, "release", None)
                if release is not None:
                    release()

    @torch.inference_mode()
    def finals(self, key: Hashable) -> list[torch.Tensor]:
        """Stack ``key``'s final states (the final norm applied to its last output), one tensor per batch."""
        with self.backend.outside():
            return [self.backend.final_states(ids, mask, self.state(key, b))
                    for b, (ids, mask) in enumerate(self.batches)]
