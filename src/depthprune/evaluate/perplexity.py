"""Perplexity on non-overlapping windows (the papers' protocol: 128-token windows).

The decoder runs once per batch; logits are then formed a chunk of tokens at a
time, so a 262k-vocabulary model never holds full logits for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from ..data.calibration import Calibration, consecutive_windows
from ..errors import InputError
from ..models.forward import decoder_passes

PPL_DATASETS = {"wikitext2": "wikitext2-test", "ptb": "ptb"}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    source: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's LM head does to final hidden states, soft-capping included (Gemma)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _window_nll(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                first_target: int, chunk_tokens: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in range(hidden.shape[0]):
        h = hidden[row, first_target - 1 : -1]
        targets = ids[row, first_target:].to(h.device)
        valid = mask[row, first_target:].bool().to(h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            logits = logits_from_hidden(model, h[sl]).float()
            nll = F.cross_entropy(logits, targets[sl], reduction="none")
            total += float(nll[valid[sl]].sum())
            count += int(valid[sl].sum())
    return total, count


@torch.inference_mode()
def perplexity_on(
    model: nn.Module,
    windows: Calibration,
    *,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on prepared windows.

    Tokens of the special prefix (BOS) are context, never targets; the first
    real token of each window is predicted from BOS when there is one.
    """
    first_target = max(1, len(windows.description.get("special_prefix", [])))
    if windows.input_ids.shape[1] <= first_target:
        raise InputError(f"windows of {windows.input_ids.shape[1]} tokens leave nothing to predict after the "
                         "special prefix; use --seq-len 2 or more (the papers use 128)")
    total, count = 0.0, 0
    for p in decoder_passes(model, windows, batch_size=batch_size, progress=progress, desc="perplexity"):
        t, c = _window_nll(model, p.hidden, p.ids, p.mask, first_target, chunk_tokens)
        total, count = total + t, count + c
    if count == 0:
        raise InputError("perplexity over zero scored tokens means nothing: the text gave no window with a "
                         "target token; use a longer text or a smaller --seq-len")
    nll = total / count
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        windows=windows.num_windows,
        seq_len=int(windows.input_ids.shape[1]),
        source=str(windows.description.get("source")),
    )


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    dataset: str | Path = "wikitext2",
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity on ``dataset`` (``wikitext2``, ``ptb``, or a local text file)."""
    source = PPL_DATASETS.get(str(dataset), dataset)
    windows = consecutive_windows(tokenizer, source, seq_len=seq_len, max_windows=max_windows)
    return perplexity_on(model, windows, batch_size=batch_size, progress=progress)
