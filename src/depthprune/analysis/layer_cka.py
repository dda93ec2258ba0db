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
from ..data.calibration import Calibration
from ..models.arch import get_layers
from ..models.forward import decoder_passes, layer_hooks
from .cka import MinibatchCKA


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
    model: nn.Module,
    calibration: Calibration,
    *,
    kernel: str = "linear",
    batch_size: int = 2,
    progress: bool = True,
) -> LayerSimilarity:
    """CKA between the outputs of every pair of decoder layers (decoder only, no LM head)."""
    cka = MinibatchCKA(kernel=kernel)
    outputs: list[torch.Tensor] = []
    tokens = 0
    with layer_hooks(get_layers(model), post=lambda i, out: outputs.append(out)):
        for p in decoder_passes(model, calibration, batch_size=batch_size, progress=progress, desc="CKA",
                                before=lambda ids, mask: outputs.clear()):
            keep = p.mask.bool().reshape(-1)
            cka.update([o.reshape(-1, o.shape[-1])[keep.to(o.device)].double() for o in outputs])
            tokens += int(keep.sum())
    return LayerSimilarity(cka.compute(), kernel, tokens, calibration.to_dict())
