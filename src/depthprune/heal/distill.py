"""Recovery beyond LoRA on language-modelling loss: distillation from the dense model, and training the last
layers instead of adapters.

* Distillation (Minitron, arXiv 2407.14679): the loss is the KL divergence from
  the original (dense, teacher) model's next-token distribution to the pruned
  (student) model's, at temperature tau (scaled by tau^2 so gradients keep their
  size), optionally mixed with the LM loss:
  ``alpha * KL + (1 - alpha) * LM``. Every predicted token carries the
  teacher's whole distribution instead of one target token. With
  ``top_k``, only the teacher's k most likely tokens are kept (renormalised),
  which bounds memory for very large vocabularies. The teacher's
  distributions come from a cache built once before training
  (:mod:`.teacher`) or, with ``teacher_cache=False``, from running the
  teacher on every step; both give the same loss (:func:`rows_loss_sum`).
* ``last:N`` (arXiv 2411.15558): fine-tune the LM head and the last N remaining
  layers in full instead of LoRA adapters everywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate.distributions import CachedRows, kl_per_token, renormalised_kl_per_token, rows_from_logits
from ..models.arch import get_layers
from .data import PadCollator


def rows_loss_sum(student: torch.Tensor, targets: torch.Tensor, rows: CachedRows, *, alpha: float = 1.0,
                  temperature: float = 1.0, renormalised: bool = False) -> torch.Tensor:
    """Summed loss over (n, vocab) student logits at positions predicting ``targets``, against the teacher's
    ``rows`` there (already at ``temperature``): KL(teacher || student) scaled by tau^2, mixed with the LM loss.

    The KL is over the full vocabulary for exact rows; over the teacher's top k + one remainder bucket for
    top-k rows (:func:`~depthprune.evaluate.divergence.kl_per_token`); with ``renormalised``, from the top k
    renormalised (``--distill-top-k``).
    """
    student = student.float()
    total = student.new_zeros(())
    if alpha > 0:
        log_q = F.log_softmax(student / temperature, dim=-1)
        kl = (renormalised_kl_per_token if renormalised else kl_per_token)(log_q, rows)
        total = total + alpha * kl.sum() * temperature**2
    if alpha < 1:
        total = total + (1 - alpha) * F.cross_entropy(student, targets, reduction="sum")
    return total


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, tokens - 1) mask of the positions whose next token is a label, and those labels."""
    targets = labels[:, 1:]
    valid = targets != -100
    return valid, targets[valid]


def distillation_loss_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
                          alpha: float = 1.0, temperature: float = 1.0,
                          top_k: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed per-token loss over the positions that predict a label, and their number (a live teacher).

    ``student`` / ``teacher`` are (batch, tokens, vocab) logits; ``labels`` uses -100 for positions
    without a target (padding, masked prompts). ``top_k``: KL from the teacher's k most likely tokens,
    renormalised.
    """
    valid, targets = label_positions(labels)
    rows = rows_from_logits(teacher[:, :-1][valid.to(teacher.device)], top_k, temperature)
    total = rows_loss_sum(student[:, :-1][valid], targets, rows.to(student.device), alpha=alpha,
                          temperature=temperature, renormalised=top_k is not None)
    return total, int(valid.sum())


class IndexedItems(torch.utils.data.Dataset):
    """Training items that say which they are (``index``), so a batch can find its rows in the teacher cache."""

    def __init__(self, items: list[dict[str, list[int]]], first: int = 0):
        self.items, self.first = items, first

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.items[i], "index": self.first + i}


@dataclass
class TeacherRowsCollator:
    """Pads like :class:`~.data.PadCollator` and adds ``teacher_rows``: the cache rows of the batch's
    positions with a label, in the order the loss reads them."""

    pad: PadCollator
    cache: Any

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {**self.pad(items), "teacher_rows": self.cache.rows_of([it["index"] for it in items])}


@functools.cache
def distill_trainer() -> type:
    """The ``Trainer`` subclass for distillation (built on first use: importing ``Trainer`` is slow)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """A ``Trainer`` whose loss is :func:`rows_loss_sum` against a frozen teacher: its cached rows
        (``cache``, a :class:`~.teacher.TeacherCache`; batches carry ``teacher_rows``), or the teacher
        itself run on every step (``teacher``).

        The loss is normalised over all target tokens of the accumulated batch
        (``num_items_in_batch``), so gradient accumulation weighs tokens, not
        micro-batches, exactly like the Trainer's own causal-LM loss.
        """

        loss_is_scaled_for_ga = True

        def __init__(self, *args: Any, alpha: float, temperature: float, top_k: int | None,
                     teacher: nn.Module | None = None, cache: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if (teacher is None) == (cache is None):
                raise ValueError("give the teacher model or its cache, not both")
            self.teacher = teacher.eval() if teacher is not None else None
            self.cache = cache
            self.alpha, self.temperature, self.top_k = alpha, temperature, top_k

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            if self.cache is not None:
                valid, targets = label_positions(labels)
                rows = self.cache.cache.take(inputs["teacher_rows"].cpu(), outputs.logits.device)
                total = rows_loss_sum(outputs.logits[:, :-1][valid], targets, rows, alpha=self.alpha,
                                      temperature=self.temperature, renormalised=self.top_k is not None)
                count = int(valid.sum())
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(
                        input_ids=inputs["input_ids"].to(self.teacher.device),
                        attention_mask=inputs["attention_mask"].to(self.teacher.device)).logits
                total, count = distillation_loss_sum(outputs.logits, teacher_logits.to(outputs.logits.device),
                                                     labels, alpha=self.alpha, temperature=self.temperature,
                                                     top_k=self.top_k)
            if num_items_in_batch is not None and model.training:
                loss = total / num_items_in_batch
            else:
                steps = self.current_gradient_accumulation_steps if model.training else 1
                loss = total / max(count, 1) / steps
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def train_last_layers(model: nn.Module, count: int) -> list[nn.Parameter]:
    """Freeze everything but the LM head and the last ``count`` decoder layers; return what will train.

    With tied input/output embeddings the head *is* the embedding matrix, so it trains too.
    """
    layers = get_layers(model)
    if count > len(layers):
        from .config import HealError

        raise HealError(f"--train-layers last:{count} asks for more layers than the model's {len(layers)}")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*model.get_output_embeddings().parameters()]
    for layer in list(layers)[-count:]:
        trainable += list(layer.parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable
