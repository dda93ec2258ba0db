"""Per-layer redundancy statistics, streamed in one decoder-only pass.

Hooks on every decoder layer see the hidden state entering it (``h_i``) and
leaving it (``h_{i+1}``); each layer's statistic is accumulated while the
states stream past, so memory stays O(tokens x hidden) whatever the depth.

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

from ..data.calibration import Calibration
from ..plan import PlanError
from ..models.arch import get_layers
from ..models.forward import decoder_passes, layer_hooks

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
    model: nn.Module,
    calibration: Calibration,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> LayerStats:
    """One forward pass of the decoder stack (no LM head) collecting every layer's statistics."""
    layers = get_layers(model)
    n_layers = len(layers)
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    last_states: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]
    batch: dict[str, torch.Tensor] = {}
    entering: dict[int, torch.Tensor] = {}

    def last_tokens(h: torch.Tensor) -> torch.Tensor:
        return h[batch["rows"].to(h.device), batch["last"].to(h.device)].float().cpu()

    def pre(i: int, h: torch.Tensor) -> None:
        entering[i] = h
        if i == 0:
            last_states[0].append(last_tokens(h))

    def post(i: int, out: torch.Tensor) -> None:
        cos = F.cosine_similarity(entering.pop(i).float(), out.float(), dim=-1)
        cos_sum[i] += float((cos * batch["mask"].to(out.device)).sum())
        last_states[i + 1].append(last_tokens(out))

    def before(ids: torch.Tensor, mask: torch.Tensor) -> None:
        batch.update(mask=mask.float(), last=last_token_index(mask), rows=torch.arange(ids.shape[0]))

    with layer_hooks(layers, pre=pre, post=post):
        passes = decoder_passes(model, calibration, batch_size=batch_size, progress=progress,
                                desc="scoring layers", before=before)
        total_tokens = sum(int(p.mask.sum()) for p in passes)
    bi = (1.0 - cos_sum / max(total_tokens, 1)).tolist()
    stacked = torch.stack([torch.cat(s) for s in last_states])
    return LayerStats(bi=bi, last_token_states=stacked, tokens=total_tokens, calibration=calibration.to_dict())
