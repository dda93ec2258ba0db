"""Next-token loss of candidate stacks on calibration windows: what SLEB minimises and how plans are ranked.

Objectives, both averaged over every predicted calibration token:

``nll``  next-token negative log-likelihood of the candidate (SLEB, arXiv 2402.09025);
``kl``   KL(dense || candidate) between the original model's and the candidate's next-token
         distributions (EvoPress, arXiv 2410.14649): it asks the candidate to behave like the
         model it came from, not just to predict the text.

A candidate is evaluated with a :class:`~depthprune.engine.states.StackRunner` (cached states, only the
candidate's own layers run, no model copy) and the LM head applied a chunk of tokens at a time. For ``kl``
the dense model's log-probabilities are cached when they fit in ``teacher_cache_mb`` and recomputed from its
cached final states otherwise.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import Calibration
from ..errors import InputError
from ..evaluate.perplexity import chunked_logits, prediction_pairs
from ..models.arch import get_layers, model_device, spec_for
from ..models.forward import batches_of
from .states import StackRunner

OBJECTIVES = ("nll", "kl")


def first_target_of(calibration: Calibration) -> int:
    """Position of the first predicted token (after BOS or any other special prefix); refuses windows with none."""
    first = max(1, len(calibration.description.get("special_prefix", [])))
    if calibration.input_ids.shape[1] <= first:
        raise InputError("calibration windows leave no token to predict; use --seq-len 2 or more")
    return first


@torch.inference_mode()
def teacher_logprobs(model: nn.Module, final: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     first_target: int, chunk_tokens: int = 512) -> torch.Tensor:
    """The dense model's next-token log-probabilities at every predicted token, from its final states."""
    states, _ = prediction_pairs(final, ids, mask, first_target)
    return torch.cat([F.log_softmax(logits, dim=-1) for _, logits in chunked_logits(model, states, chunk_tokens)])


@torch.inference_mode()
def objective_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  first_target: int, chunk_tokens: int = 512,
                  teacher: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed objective over one batch's predicted tokens given its final states, and their count: next-token
    NLL, or KL(teacher || model) when the dense model's ``teacher`` log-probabilities are given."""
    states, targets = prediction_pairs(hidden, ids, mask, first_target)
    total = 0.0
    for part, logits in chunked_logits(model, states, chunk_tokens):
        if teacher is None:
            total += float(F.cross_entropy(logits, targets[part], reduction="sum"))
        else:
            logp = F.log_softmax(logits, dim=-1)
            total += float(F.kl_div(logp, teacher[part], log_target=True, reduction="sum"))
    return total, int(targets.numel())


class LossEngine:
    """Calibration loss of stacks built from the original model's layers (and merged or patched ones)."""

    def __init__(self, model: nn.Module, calibration: Calibration, *, objective: str = "nll",
                 batch_size: int | None = None, chunk_tokens: int = 512, teacher_cache_mb: float = 1024) -> None:
        if objective not in OBJECTIVES:
            raise InputError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.model = model
        self.spec = spec_for(model)
        self.objective = objective
        self.chunk_tokens = chunk_tokens
        self.layers: list[nn.Module] = list(get_layers(model))
        self.num_layers = len(self.layers)
        self.first_target = first_target_of(calibration)
        device = model_device(model)
        batches = [(ids.to(device), mask.to(device)) for ids, mask in batches_of(calibration, batch_size)]
        self.original = StackRunner(model, batches, self.layers)
        self.batches = self.original.batches
        self.evaluations = 0
        self._teacher: list[torch.Tensor] | None = None
        if objective == "kl":
            tokens = sum(prediction_pairs(h, ids, mask, self.first_target)[1].numel()
                         for h, (ids, mask) in zip(self.original.finals, self.batches))
            vocab = model.get_output_embeddings().weight.shape[0]
            if tokens * vocab * 4 / 2**20 <= teacher_cache_mb:
                self._teacher = [self._teacher_logprobs(b) for b in range(len(self.batches))]
        self.dense_loss = self.loss(self.original.finals)

    def per_layer_of(self, indices: Sequence[int]) -> dict[str, list]:
        """Per-layer config entries of original layers ``indices``."""
        return self.original.per_layer_of(indices)

    def _teacher_logprobs(self, b: int) -> torch.Tensor:
        ids, mask = self.batches[b]
        return teacher_logprobs(self.model, self.original.finals[b], ids, mask, self.first_target, self.chunk_tokens)

    def batch_loss(self, b: int, hidden: torch.Tensor) -> tuple[float, int]:
        """Summed objective over the predicted tokens of batch ``b`` given its final states, and their count."""
        ids, mask = self.batches[b]
        teacher = None
        if self.objective == "kl":
            teacher = self._teacher[b] if self._teacher is not None else self._teacher_logprobs(b)
        return objective_sum(self.model, hidden, ids, mask, self.first_target, self.chunk_tokens, teacher)

    def loss(self, finals: Sequence[torch.Tensor]) -> float:
        """Mean objective given every batch's final states."""
        total, count = 0.0, 0
        for b, hidden in enumerate(finals):
            t, c = self.batch_loss(b, hidden)
            total, count = total + t, count + c
        return total / count

    def loss_from(self, runner: StackRunner, start: int, modules: Sequence[nn.Module],
                  per_layer: dict[str, list]) -> float:
        """Mean objective of ``runner``'s stack with positions ``start..`` replaced by ``modules``."""
        self.evaluations += 1
        total, count = 0.0, 0
        for b, hidden in runner.run_from(start, modules, per_layer):
            t, c = self.batch_loss(b, hidden)
            total, count = total + t, count + c
        return total / count
