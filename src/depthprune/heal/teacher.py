"""The distillation teacher, run once: its next-token distributions at every trained position, cached on disk.

Running the dense model beside the student on every step costs a forward of the larger model per step, again
for every epoch and every recipe. Instead, before training, the teacher runs once over every training and
validation item (batched, the LM head a chunk of tokens at a time) and its distributions at the positions the
loss reads (those that predict a label) are stored as memory-mapped files in the heal work directory (or
``teacher_cache_dir``, where a later run with the same teacher, data and settings reuses them). Each step then
reads its batch's rows; the teacher is not loaded at all when a matching cache exists.

What is kept, and the loss it gives (:func:`depthprune.heal.distill.rows_loss_sum`):

* ``distill_top_k=K``: the teacher's K most likely tokens. The loss is the KL from those K renormalised to sum
  to one (what ``--distill-top-k`` has always meant), identical to the live teacher's.
* otherwise the full distribution when it fits ``teacher_cache_mb``: identical to the live teacher's loss;
* else the teacher's ``teacher_top_k`` most likely tokens + the log of the mass outside them: the loss is KL
  over those tokens plus one remainder bucket, a lower bound of the full KL (equal when k covers the
  vocabulary). The heal record says which.

The temperature is applied when the cache is built (a cache is made for one temperature), so every option
above is exact for any ``--temperature``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluate.distributions import (
    DistributionCache,
    choose_top_k,
    rows_from_logits,
    tokens_sha256,
    vocab_size_of,
)
from ..evaluate.perplexity import chunked_logits
from ..io import prepare_dir
from ..models.arch import model_device
from ..models.forward import run_decoder
from .config import HealConfig, HealError
from .data import PadCollator

log = logging.getLogger(__name__)

TEACHER_CACHE = "teacher-cache"


@dataclass
class Teacher:
    """The dense model distillation learns from, by source, loaded only when its cache has to be built."""

    source: str
    load: Callable[[], nn.Module]


def target_count(item: dict[str, list[int]]) -> int:
    """Positions of an item the loss reads: those whose next token is a label."""
    return sum(label != -100 for label in item["labels"][1:])


def item_digests(items: Sequence[dict[str, list[int]]]) -> list[str]:
    """One short fingerprint per item: a cache serves any run whose items are a prefix of the ones it covers
    (healing on a smaller token budget reads a prefix of the same shuffled split)."""
    return [tokens_sha256(torch.tensor(it["input_ids"]), torch.tensor(it["labels"]))[:16] for it in items]


def loss_name(cache: DistributionCache | None, config: HealConfig) -> str:
    """The distillation loss in words, as the heal record states it."""
    if config.distill_top_k is not None:
        return f"KL from the teacher's top-{config.distill_top_k} tokens renormalised (--distill-top-k)"
    if cache is None or not cache.approximate:
        return "KL over the full vocabulary"
    return (f"KL over the teacher's top-{cache.top_k} tokens + one remainder bucket (a lower bound of the full "
            f"KL: the full distributions exceed {config.teacher_cache_mb:g} MiB)")


@dataclass
class TeacherCache:
    """The teacher's rows for a list of items; item ``i`` owns rows ``offsets[i]:offsets[i + 1]``."""

    cache: DistributionCache
    offsets: torch.Tensor
    record: dict[str, Any]

    def rows_of(self, items: Sequence[int]) -> torch.Tensor:
        return rows_of(self.offsets, items)


def rows_of(offsets: torch.Tensor, items: Sequence[int]) -> torch.Tensor:
    """Row ids of ``items`` in batch order: the order of a padded batch's positions with a label."""
    return torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in items])


def teacher_cache(teacher: Teacher | nn.Module, items: Sequence[dict[str, list[int]]], directory: Path,
                  config: HealConfig, *, vocab_size: int, pad: int, progress: bool = True,
                  built_by_main: bool = False) -> TeacherCache:
    """The teacher's distributions for ``items``: reused from ``directory`` when it holds a matching cache,
    else computed (the teacher loaded, run once, freed) and written there.

    ``built_by_main``: this is not the main process of a launch, which has just built the cache for these
    same items; it is read, never rebuilt (even when the teacher is a model object, whose source is unknown).
    """
    counts = [target_count(it) for it in items]
    offsets = torch.tensor([0, *counts]).cumsum(0)
    tokens = int(offsets[-1])
    top_k = (config.distill_top_k if config.distill_top_k is not None
             else choose_top_k(tokens, vocab_size, config.teacher_top_k, config.teacher_cache_mb))
    source = teacher.source if isinstance(teacher, Teacher) else None
    expected = {"teacher": source, "temperature": config.temperature, "top_k": top_k, "vocab_size": vocab_size}
    digests = item_digests(items)
    found = DistributionCache.open(directory)
    if found is not None:
        differs = found.mismatch(expected) or (None if found.meta.get("items", [])[: len(digests)] == digests
                                               else "other items")
        if (source is not None or built_by_main) and differs is None:
            return TeacherCache(found, offsets, {**_describe(found, directory), "tokens": tokens, "reused": True,
                                                 "seconds": 0.0})
        log.warning("rebuilding the teacher cache in %s: it was made for other settings (%s)", directory,
                    differs or "teacher unknown")
    if built_by_main:
        raise HealError(f"the main process left no usable teacher cache in {directory} "
                        f"({'none there' if found is None else differs}); this process cannot build its own")
    expected["items"] = digests

    prepare_dir(directory, TEACHER_CACHE)
    start = time.perf_counter()
    model = teacher.load() if isinstance(teacher, Teacher) else teacher
    if vocab_size_of(model) != vocab_size:
        raise HealError(f"the teacher {source or ''} has a vocabulary of {vocab_size_of(model):,} tokens and the "
                        f"student {vocab_size:,}: distillation needs the same tokenizer; pass --teacher with the "
                        "dense model this one was made from")
    cache = DistributionCache.allocate(tokens, vocab_size, top_k, expected, directory)
    _fill(model, items, offsets, cache, config, pad, progress)
    del model
    cache.finish(directory)
    seconds = time.perf_counter() - start
    return TeacherCache(cache, offsets, {**_describe(cache, directory), "reused": False, "seconds": seconds,
                                         "tokens_per_s": tokens / seconds if seconds else None})


@torch.inference_mode()
def _fill(model: nn.Module, items: Sequence[dict[str, list[int]]], offsets: torch.Tensor, cache: DistributionCache,
          config: HealConfig, pad: int, progress: bool) -> None:
    """One teacher forward per batch of items (similar lengths together: little padding), rows stored in place."""
    was_training = model.training
    model.eval()
    collate, device = PadCollator(pad), model_device(model)
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    batch_size = config.eval_batch_size or config.batch_size
    for b in tqdm(range(0, len(order), batch_size), desc="teacher cache", unit="batch", disable=not progress):
        picked = order[b : b + batch_size]
        batch = collate([items[i] for i in picked])
        hidden = run_decoder(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        states = hidden[:, :-1][(batch["labels"][:, 1:] != -100).to(hidden.device)]
        rows = rows_of(offsets, picked)
        for part, logits in chunked_logits(model, states):
            cache.put(rows[part], rows_from_logits(logits, cache.top_k, config.temperature))
    model.train(was_training)


def _describe(cache: DistributionCache, directory: Path) -> dict[str, Any]:
    size = sum(t.numel() * t.element_size() for t in cache.rows.tensors().values())
    return {"dir": str(directory), "tokens": len(cache), "kind": "exact" if cache.top_k is None else "top-k",
            "top_k": cache.top_k, "approximate": cache.approximate, "bytes": size,
            "temperature": cache.meta.get("temperature")}
