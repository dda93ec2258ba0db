"""The similarity engine shared by SLM and LaCo.

Both searches ask one question many times: *if layers from ``start`` upward
were replaced by this candidate stack, how similar would the final hidden
states be to the original model's?* (mean over samples of the cosine between
each sample's flattened (tokens x hidden) final states, padding excluded).

The engine answers with a :class:`~depthprune.backend.walk.Walker` on any
backend: no LM head, no model copy, the original states entering every layer
computed once, and each candidate running only its own layers from the state
entering its window (a streamed model reads just those layers).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backend import InMemoryBackend, Stack, Walker
from ..data.calibration import Calibration
from ..models.forward import batches_of


class SimilarityEngine:
    """Evaluates candidate stacks against the original model on fixed calibration windows.

    ``model`` is a model or a :class:`~depthprune.backend.Backend`. Close the engine (or use it as a context
    manager) to free a streamed model's spilled states.
    """

    def __init__(self, model, calibration: Calibration, *, batch_size: int | None = None,
                 progress: bool = False) -> None:
        self.backend = InMemoryBackend.of(model)
        self.spec = self.backend.spec
        self.layers: list[nn.Module] = list(self.backend.layers)
        self.num_layers = len(self.layers)
        # at the peak: the states entering every layer, the original's output, the input and one candidate
        self.walker = Walker(self.backend, batches_of(calibration, batch_size), sets=self.num_layers + 4)
        try:
            self.walker.run({"original": Stack(self.layers)}, keep={"original": range(self.num_layers)},
                            progress=progress, desc="original states")
            self.reference = self.walker.finals("original")
        except BaseException:
            self.walker.close()
            raise
        self.evaluations = 0

    def close(self) -> None:
        self.walker.close()

    def __enter__(self) -> "SimilarityEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.inference_mode()
    def similarity(self, start: int, modules: list[nn.Module]) -> float:
        """Mean over samples of cos(flat original final states, flat candidate final states).

        The candidate is the original model with every layer from ``start`` up replaced by ``modules``.
        """
        self.evaluations += 1
        self.walker.run({"candidate": Stack(modules, start=("enter", "original", start))})
        sims: list[float] = []
        for b, final in enumerate(self.walker.finals("candidate")):
            sims.extend(flat_cosine(self.reference[b], final, self.walker.batches[b][1]))
        return float(sum(sims) / len(sims))


def flat_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per sample: cosine between the (tokens x hidden) matrices flattened, padding zeroed."""
    m = mask.to(a.device, torch.float64).unsqueeze(-1)
    a, b = a.double() * m, b.double().to(a.device) * m
    dot = (a * b).sum(dim=(1, 2))
    norms = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
    return (dot / norms.clamp_min(1e-30)).tolist()
