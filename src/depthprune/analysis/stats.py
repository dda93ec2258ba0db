"""Per-layer redundancy statistics, accumulated in one decoder-only pass.

The pass (:func:`~depthprune.backend.walk.walk_layers`) shows each layer's
input (``h_i``) and output (``h_{i+1}``); each layer's statistic is accumulated
as the states go by, so memory stays O(tokens x hidden) whatever the depth, and
a streamed model is scored one layer at a time by the same code.

* Block Influence (ShortGPT): ``BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t])``
  over every non-padding calibration token.
* Angular distance (Gromov et al.): ``d(l, n) = arccos(cos(h_l[T], h_{l+n}[T])) / pi``
  on each sample's last real token T, averaged over samples; only the
  (L+1) last-token vectors per sample are kept, which is tiny.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import Backend, InMemoryBackend, walk_layers
from ..data.calibration import Calibration
from ..models.forward import batches_of
from ..plan import PlanError

METRICS = ("bi", "angular")


@dataclass
class LayerStats:
    """What one pass over the calibration windows measured."""

    bi: list[float]
    last_token_states: torch.Tensor  # (L+1, samples, hidden), float32, on CPU
    tokens: int
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.bi)

    def angular_distance(self, block: int) -> list[float]:
        """``d(l, block)`` for every start l with ``l + block <= L``."""
        if not 1 <= block < self.num_layers:
            raise PlanError(f"block size must be between 1 and {self.num_layers - 1}, got {block}")
        h = self.last_token_states
        dists = []
        for start in range(self.num_layers - block + 1):
            cos = F.cosine_similarity(h[start], h[start + block], dim=-1).clamp(-1.0, 1.0)
            dists.append(float((torch.arccos(cos) / math.pi).mean()))
        return dists

    def scores(self, metric: str) -> list[float]:
        """Per-layer score, low = redundant. ``angular`` is d(l, 1) of each single layer."""
        if metric == "bi":
            return list(self.bi)
        if metric == "angular":
            return self.angular_distance(1)
        raise PlanError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask).argmax(dim=1)


@torch.inference_mode()
def layer_statistics(
    model: "nn.Module | Backend",
    calibration: Calibration,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> LayerStats:
    """One pass of the decoder stack (no LM head) over the calibration windows collecting every layer's
    statistics; ``model`` is a model or a :class:`~depthprune.backend.Backend` (streamed: one layer at a time)."""
    backend = InMemoryBackend.of(model)
    n_layers = backend.num_layers
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    last_states: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]
    picks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def last_tokens(b: int, h: torch.Tensor) -> torch.Tensor:
        _, last, rows = picks[b]
        return h[rows.to(h.device), last.to(h.device)].float().cpu()

    def on_input(b: int, ids: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor) -> None:
        picks[b] = (mask.float(), last_token_index(mask), torch.arange(ids.shape[0]))
        last_states[0].append(last_tokens(b, h0))

    def on_layer(i: int, b: int, mask: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        cos_sum[i] += float((cos * picks[b][0].to(h_out.device)).sum())
        last_states[i + 1].append(last_tokens(b, h_out))

    batches = walk_layers(backend, batches_of(calibration, batch_size), on_input=on_input, on_layer=on_layer,
                          progress=progress, desc="scoring layers")
    total_tokens = sum(int(mask.sum()) for _, mask in batches)
    bi = (1.0 - cos_sum / max(total_tokens, 1)).tolist()
    stacked = torch.stack([torch.cat(s) for s in last_states])
    return LayerStats(bi=bi, last_token_states=stacked, tokens=total_tokens, calibration=calibration.to_dict())
