"""Recovery beyond LoRA on language-modelling loss: distillation from the dense model, and training the last
layers instead of adapters.

* Distillation (Minitron, arXiv 2407.14679): the loss is the KL divergence from
  the original (dense, teacher) model's next-token distribution to the pruned
  (student) model's, at temperature tau (scaled by tau^2 so gradients keep their
  size), optionally mixed with the LM loss:
  ``alpha * KL + (1 - alpha) * LM``. Every predicted token carries the
  teacher's whole distribution instead of one target token. With
  ``top_k``, only the teacher's k most likely tokens are kept (renormalised),
  which bounds memory for very large vocabularies.
* ``last:N`` (arXiv 2411.15558): fine-tune the LM head and the last N remaining
  layers in full instead of LoRA adapters everywhere.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.arch import get_layers


def distillation_loss_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
                          alpha: float = 1.0, temperature: float = 1.0,
                          top_k: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed per-token loss over the positions that predict a label, and their number.

    ``student`` / ``teacher`` are (batch, tokens, vocab) logits; ``labels`` uses -100 for positions
    without a target (padding, masked prompts).
    """
    targets = labels[:, 1:]
    valid = targets != -100
    s = student[:, :-1][valid].float()
    t = teacher[:, :-1][valid].float()
    total = s.new_zeros(())
    if alpha > 0:
        log_q = F.log_softmax(s / temperature, dim=-1)
        if top_k is not None and top_k < t.shape[-1]:
            values, index = t.topk(top_k, dim=-1)
            log_p = F.log_softmax(values / temperature, dim=-1)
            log_q = log_q.gather(-1, index)
        else:
            log_p = F.log_softmax(t / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum()
        total = total + alpha * kl * temperature**2
    if alpha < 1:
        total = total + (1 - alpha) * F.cross_entropy(s, targets[valid], reduction="sum")
    return total, int(valid.sum())


@functools.cache
def distill_trainer() -> type:
    """The ``Trainer`` subclass for distillation (built on first use: importing ``Trainer`` is slow)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """A ``Trainer`` whose loss is :func:`distillation_loss_sum` against a frozen teacher.

        The loss is normalised over all target tokens of the accumulated batch
        (``num_items_in_batch``), so gradient accumulation weighs tokens, not
        micro-batches, exactly like the Trainer's own causal-LM loss.
        """

        loss_is_scaled_for_ga = True

        def __init__(self, *args: Any, teacher: nn.Module, alpha: float, temperature: float, top_k: int | None,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval()
            self.alpha, self.temperature, self.top_k = alpha, temperature, top_k

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=inputs["input_ids"].to(self.teacher.device),
                                              attention_mask=inputs["attention_mask"].to(self.teacher.device)).logits
            total, count = distillation_loss_sum(outputs.logits, teacher_logits.to(outputs.logits.device), labels,
                                                 alpha=self.alpha, temperature=self.temperature, top_k=self.top_k)
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
