"""The similarity engine shared by SLM and LaCo.

Both searches ask one question many times: *if layers from ``start`` upward
were replaced by this candidate stack, how similar would the final hidden
states be to the original model's?* (mean over samples of the cosine between
each sample's flattened (tokens x hidden) final states, padding excluded).

The engine answers without the LM head and without copying the model:

* the original final states are computed once;
* the original hidden state entering any layer is available from a cache:
  inputs of every k-th layer (k ~ sqrt(L)) are kept, and the k states of the
  current segment are recomputed from the nearest checkpoint when first asked
  for (searches walk downwards, so each segment is computed once); memory is
  O(sqrt(L)) states instead of L;
* a candidate runs only its own layers: the model's decoder stack is swapped
  for ``[replay(h_start), skip, ..., candidate layers]`` for the duration of
  one forward, so masks and rotary embeddings come from the model's own code.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from ..data.calibration import Calibration
from ..models.arch import (
    get_layers,
    model_device,
    per_layer_config_values,
    spec_for,
    temporary_layer_stack,
)
from ..models.forward import decoder_passes, layer_hooks, run_decoder
from .merged import MergedLayer


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


class SimilarityEngine:
    """Evaluates candidate stacks against the original model on fixed calibration windows."""

    def __init__(
        self,
        model: nn.Module,
        calibration: Calibration,
        *,
        batch_size: int | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        self.model = model
        self.spec = spec_for(model)
        self.layers: list[nn.Module] = list(get_layers(model))
        self.num_layers = len(self.layers)
        self.per_layer = per_layer_config_values(model.config, self.spec)
        self.device = model_device(model)
        self.batches = [
            (ids.to(self.device), mask.to(self.device))
            for ids, mask in calibration.batches(batch_size or calibration.num_windows)
        ]
        self.every = checkpoint_every or max(1, round(math.sqrt(self.num_layers)))
        self.evaluations = 0
        self._replay = _Replay()
        self._skip = _Skip()
        self._checkpoints: dict[int, list[torch.Tensor]] = {}
        self._segment: dict[int, list[torch.Tensor]] = {}
        self.reference = self._capture_original()

    @torch.inference_mode()
    def _capture_original(self) -> list[torch.Tensor]:
        wanted = list(range(0, self.num_layers, self.every))
        grabbed: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
        with layer_hooks([self.layers[i] for i in wanted], indices=wanted,
                         pre=lambda i, h: grabbed[i].append(h)):
            finals = [p.hidden for p in decoder_passes(self.model, self.batches)]
        self._checkpoints = grabbed
        return finals

    def _stack(self, start: int, modules: list[nn.Module], per_layer: dict[str, list]):
        """Positions 0..start-1 replay/skip the original layers; candidate layers follow."""
        prefix: list[nn.Module] = [self._replay] + [self._skip] * (start - 1) if start > 0 else []
        lists = {name: values[:start] + per_layer[name] for name, values in self.per_layer.items()}
        return temporary_layer_stack(self.model, prefix + modules, lists)

    def original_per_layer(self, indices: list[int]) -> dict[str, list]:
        """Per-layer config entries a candidate layer standing for original ``indices`` carries."""
        return {name: [values[i] for i in indices] for name, values in self.per_layer.items()}

    @torch.inference_mode()
    def layer_input(self, index: int) -> list[torch.Tensor]:
        """The original model's hidden state entering layer ``index``, one tensor per batch."""
        if index in self._checkpoints:
            return self._checkpoints[index]
        if index not in self._segment:
            start = (index // self.every) * self.every
            end = min(start + self.every, self.num_layers)
            self._segment = {}
            outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(start + 1, end)}
            run = self.layers[start : end - 1]
            try:
                with layer_hooks(run, indices=range(start + 1, end), post=lambda i, h: outputs[i].append(h)), \
                        self._stack(start, run, self.original_per_layer(list(range(start, end - 1)))):
                    for b, (ids, mask) in enumerate(self.batches):
                        self._replay.state = self._checkpoints[start][b]
                        run_decoder(self.model, ids, mask)
            finally:
                self._replay.state = None
            self._segment = outputs
        return self._segment[index]

    @torch.inference_mode()
    def similarity(self, start: int, modules: list[nn.Module], per_layer: dict[str, list]) -> float:
        """Mean over samples of cos(flat original final states, flat candidate final states).

        The candidate is the original model with every layer from ``start`` up
        replaced by ``modules`` (whose per-layer config entries are ``per_layer``).
        """
        self.evaluations += 1
        h_start = self.layer_input(start) if start > 0 else None
        sims: list[float] = []
        try:
            with self._stack(start, modules, per_layer):
                for b, (ids, mask) in enumerate(self.batches):
                    if h_start is not None:
                        self._replay.state = h_start[b]
                    final = run_decoder(self.model, ids, mask)
                    sims.extend(_flat_cosine(self.reference[b], final, mask))
        finally:
            self._replay.state = None
            for m in modules:
                if isinstance(m, MergedLayer):
                    m.release()
        return float(sum(sims) / len(sims))


def _flat_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per sample: cosine between the (tokens x hidden) matrices flattened, padding zeroed."""
    m = mask.to(a.device, torch.float64).unsqueeze(-1)
    a, b = a.double() * m, b.double() * m
    dot = (a * b).sum(dim=(1, 2))
    norms = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
    return (dot / norms.clamp_min(1e-30)).tolist()

