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
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.arch import get_base_model, get_layers, model_device
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
    layers = get_layers(model)
    base = get_base_model(model)
    device = model_device(model)
    cka = MinibatchCKA(kernel=kernel)
    outputs: list[torch.Tensor] = []

    def grab(module, args, kwargs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(grab, with_kwargs=True) for layer in layers]
    tokens = 0
    try:
        for ids, mask in tqdm(list(calibration.batches(batch_size)), desc="CKA", disable=not progress):
            outputs.clear()
            base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            keep = mask.bool().reshape(-1)
            reps = [o.reshape(-1, o.shape[-1])[keep.to(o.device)].double() for o in outputs]
            cka.update(reps)
            tokens += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    return LayerSimilarity(cka.compute(), kernel, tokens, calibration.to_dict())
