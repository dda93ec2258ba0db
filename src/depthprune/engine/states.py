"""Run any stack of decoder layers on fixed calibration batches, from any position, without the LM head.

Every search in depthprune asks the same kind of question many times: *what
would the final hidden states be if the layers from position ``start`` up were
these modules?* :class:`StackRunner` answers it for one *reference* stack (the
original model for SLM/LaCo, the model as pruned so far for SLEB):

* the reference stack's final states (the base model's output, after the final
  norm) are computed once;
* the hidden state entering any reference position is available from a cache:
  states entering every k-th position (k ~ sqrt(L)) are kept, and the states of
  one segment are recomputed from the nearest checkpoint when first asked for
  (searches walk positions downwards, so each segment is computed once per
  runner); memory is O(sqrt(L)) states instead of L;
* a candidate runs only its own layers: the model's decoder stack is swapped for
  ``[replay(h_start), skip, ..., candidate modules]`` for one forward, so
  attention masks and rotary embeddings still come from the model's own code,
  and nothing is copied.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn

from ..models.arch import per_layer_config_values, spec_for, temporary_layer_stack
from ..models.forward import Batch, decoder_passes, layer_hooks, run_decoder


class _Replay(nn.Module):
    """Stands at position 0 and emits the cached state entering the first candidate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.state: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.state


class _Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class StackRunner:
    """Cached states of a reference stack, and runs of candidate suffixes from any of its positions.

    ``layers`` is the reference stack (modules, in order) and ``per_layer`` its per-layer config entries
    (e.g. Gemma's ``layer_types``), one per module; ``batches`` are (ids, mask) pairs on the model's device.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], layers: Sequence[nn.Module],
                 per_layer: dict[str, list] | None = None, *, checkpoint_every: int | None = None) -> None:
        self.model = model
        self.batches = list(batches)
        self.layers = list(layers)
        self.per_layer = per_layer if per_layer is not None else per_layer_config_values(model.config,
                                                                                         spec_for(model))
        self.every = checkpoint_every or max(1, round(math.sqrt(len(self.layers))))
        self._replay = _Replay()
        self._skip = _Skip()
        self._segment: dict[int, list[torch.Tensor]] = {}
        self._checkpoints: dict[int, list[torch.Tensor]] = {}
        self.finals = self._capture()

    def __len__(self) -> int:
        return len(self.layers)

    @torch.inference_mode()
    def _capture(self) -> list[torch.Tensor]:
        wanted = list(range(0, len(self.layers), self.every))
        grabbed: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
        with layer_hooks([self.layers[i] for i in wanted], indices=wanted, pre=lambda i, h: grabbed[i].append(h)), \
                self._stack(0, self.layers, self.per_layer):
            finals = [p.hidden for p in decoder_passes(self.model, self.batches)]
        self._checkpoints = grabbed
        return finals

    def _stack(self, start: int, modules: Sequence[nn.Module], per_layer: dict[str, list]):
        """Positions 0..start-1 replay/skip the reference layers; ``modules`` follow."""
        prefix: list[nn.Module] = [self._replay] + [self._skip] * (start - 1) if start > 0 else []
        lists = {name: values[:start] + list(per_layer[name]) for name, values in self.per_layer.items()}
        return temporary_layer_stack(self.model, prefix + list(modules), lists)

    def per_layer_of(self, positions: Sequence[int]) -> dict[str, list]:
        """Per-layer config entries of reference ``positions``."""
        return {name: [values[i] for i in positions] for name, values in self.per_layer.items()}

    @torch.inference_mode()
    def entering(self, index: int) -> list[torch.Tensor]:
        """The reference stack's hidden state entering position ``index``, one tensor per batch."""
        if index in self._checkpoints:
            return self._checkpoints[index]
        if index not in self._segment:
            start = (index // self.every) * self.every
            end = min(start + self.every, len(self.layers))
            self._segment = {}
            outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(start + 1, end)}
            run = self.layers[start : end - 1]
            try:
                with layer_hooks(run, indices=range(start + 1, end), post=lambda i, h: outputs[i].append(h)), \
                        self._stack(start, run, self.per_layer_of(range(start, end - 1))):
                    for b, (ids, mask) in enumerate(self.batches):
                        self._replay.state = self._checkpoints[start][b]
                        run_decoder(self.model, ids, mask)
            finally:
                self._replay.state = None
            self._segment = outputs
        return self._segment[index]

    @torch.inference_mode()
    def run_from(self, start: int, modules: Sequence[nn.Module],
                 per_layer: dict[str, list]) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch index, final states) of the reference stack with positions ``start..`` replaced by ``modules``."""
        h_start = self.entering(start) if start > 0 else None
        try:
            with self._stack(start, modules, per_layer):
                for b, (ids, mask) in enumerate(self.batches):
                    if h_start is not None:
                        self._replay.state = h_start[b]
                    yield b, run_decoder(self.model, ids, mask)
        finally:
            self._replay.state = None
