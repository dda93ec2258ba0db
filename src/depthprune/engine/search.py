"""The similarity engine shared by SLM and LaCo.

Both searches ask one question many times: *if layers from ``start`` upward
were replaced by this candidate stack, how similar would the final hidden
states be to the original model's?* (mean over samples of the cosine between
each sample's flattened (tokens x hidden) final states, padding excluded).

The engine answers with a :class:`~depthprune.engine.states.StackRunner` over
the original layers: no LM head, no model copy, the original states entering
any layer from a checkpointed cache, and each candidate running only its own
layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.calibration import Calibration
from ..models.arch import get_layers, model_device, spec_for
from ..models.forward import batches_of
from .merged import MergedLayer
from .states import StackRunner


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
        device = model_device(model)
        batches = [(ids.to(device), mask.to(device)) for ids, mask in batches_of(calibration, batch_size)]
        self.runner = StackRunner(model, batches, self.layers, checkpoint_every=checkpoint_every)
        self.reference = self.runner.finals
        self.evaluations = 0

    def original_per_layer(self, indices: list[int]) -> dict[str, list]:
        """Per-layer config entries a candidate layer standing for original ``indices`` carries."""
        return self.runner.per_layer_of(indices)

    def layer_input(self, index: int) -> list[torch.Tensor]:
        """The original model's hidden state entering layer ``index``, one tensor per batch."""
        return self.runner.entering(index)

    @torch.inference_mode()
    def similarity(self, start: int, modules: list[nn.Module], per_layer: dict[str, list]) -> float:
        """Mean over samples of cos(flat original final states, flat candidate final states).

        The candidate is the original model with every layer from ``start`` up
        replaced by ``modules`` (whose per-layer config entries are ``per_layer``).
        """
        self.evaluations += 1
        sims: list[float] = []
        try:
            for b, final in self.runner.run_from(start, modules, per_layer):
                sims.extend(flat_cosine(self.reference[b], final, self.runner.batches[b][1]))
        finally:
            for m in modules:
                if isinstance(m, MergedLayer):
                    m.release()
        return float(sum(sims) / len(sims))


def flat_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per sample: cosine between the (tokens x hidden) matrices flattened, padding zeroed."""
    m = mask.to(a.device, torch.float64).unsqueeze(-1)
    a, b = a.double() * m, b.double() * m
    dot = (a * b).sum(dim=(1, 2))
    norms = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
    return (dot / norms.clamp_min(1e-30)).tolist()

