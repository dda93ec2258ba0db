"""Layer x layer similarity of a model's layer outputs with minibatch CKA (the SLM paper's analysis).

Examples are tokens: each minibatch's non-padding tokens give every layer an
(n_tokens x hidden) representation; :class:`MinibatchCKA` accumulates the
unbiased HSIC terms over minibatches. The "patches" of consecutive layers
with high mutual CKA are what SLM's sliding window merges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from ..backend import Backend, InMemoryBackend, walk_layers
from ..data.calibration import Calibration
from ..models.forward import batches_of
from .cka import MinibatchCKA, check_example_count


@dataclass
class LayerSimilarity:
    matrix: np.ndarray
    kernel: str
    tokens: int
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "tokens": self.tokens, "calibration": self.calibration,
                "matrix": self.matrix.tolist()}


@torch.inference_mode()
def layer_similarity(
    model: "nn.Module | Backend",
    calibration: Calibration,
    *,
    kernel: str = "linear",
    batch_size: int = 2,
    progress: bool = True,
) -> LayerSimilarity:
    """CKA between the outputs of every pair of decoder layers (decoder only, no LM head).

    Each layer's kernel on each minibatch (n x n, float64, n = the minibatch's real tokens) is kept until the
    minibatch has passed every layer (streamed: until every layer was read; they count towards its memory
    plan), then the minibatch's HSIC terms are accumulated.
    """
    backend = InMemoryBackend.of(model)
    cka = MinibatchCKA(kernel=kernel)
    batches = batches_of(calibration, batch_size)
    tokens_per_batch = [int(mask.sum()) for _, mask in batches]
    for n in tokens_per_batch:
        check_example_count(n)  # before any layer runs
    kernels: dict[tuple[int, int], torch.Tensor] = {}

    def on_layer(i: int, b: int, mask: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        keep = mask.bool().reshape(-1)
        kernels[b, i] = cka.kernel_of(h_out.reshape(-1, h_out.shape[-1])[keep.to(h_out.device)].double())

    def on_output(b: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> None:
        cka.update_kernels(torch.stack([kernels.pop((b, i)) for i in range(backend.num_layers)]))

    extra = backend.num_layers * sum(n * n * 8 for n in tokens_per_batch)
    walk_layers(backend, batches, on_layer=on_layer, on_output=on_output, extra=extra, progress=progress,
                desc="CKA")
    return LayerSimilarity(cka.compute(), kernel, sum(tokens_per_batch), calibration.to_dict())
