"""How far a model's next-token distributions are from a reference (dense) model's: KL and top-1 agreement.

Perplexity moves little when a model loses a few percent, and zero-shot accuracy on a few hundred items is
inside its noise; llama.cpp judges quantised models instead by the mean per-token KL(reference || model) and
how often both models' most likely next token is the same. Both are measured here at exactly the positions
perplexity scores (:func:`~depthprune.evaluate.perplexity.prediction_pairs`: the special prefix is context,
padding never a target), on the same windows.

The reference's log-probabilities are computed once, from its final hidden states with the LM head applied a
chunk of tokens at a time, and kept in a :class:`DistributionCache`:

* ``exact``: every position's full-vocabulary log-probabilities, when they fit ``exact_budget_mb`` (1.5 GiB);
* ``top-k``: the reference's k most likely tokens (log-probabilities and ids) and the log of the probability
  mass outside them.

Over a top-k cache, KL is taken over k + 1 outcomes: the k tokens and one bucket for the rest (the model's
bucket is its mass outside the reference's top k). Merging outcomes never increases KL (the log-sum
inequality), so that value is a **lower bound** of the true KL, equal to it when k covers the vocabulary.
``top1`` is exact either way: the reference's argmax is stored.

Everything is a function of (model with its head, final states, ids, mask), like
:func:`~depthprune.evaluate.perplexity.nll_sum`, so any way of producing final states (the in-memory model,
layer streaming, cached states below a trained layer) can build a cache or be measured against one. The same
rows serve as a distillation teacher (:mod:`depthprune.heal.teacher`), where the loss needs gradients:
:func:`kl_per_token` is differentiable in the model's log-probabilities.

The rows, KL and the cache are in :mod:`.distributions`, which model is the reference in :mod:`.reference`;
their names are importable from here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import Backend, InMemoryBackend, walk_layers
from ..data.calibration import Calibration
from ..errors import InputError
from ..models.forward import batches_of
from .distributions import (CACHE_FORMAT, DEFAULT_TOP_K, EXACT_BUDGET_MB, META_FILE, CachedRows,  # noqa: F401
                            DistributionCache, DivergenceError, cache_bytes, choose_top_k, kl_per_token,
                            renormalised_kl_per_token, rows_from_logits, tokens_sha256, vocab_size_of)
from .perplexity import PerplexityResult, batch_spans, chunked_logits, first_target_of, per_domain, prediction_pairs
from .reference import (check_reference_vocab, load_reference, recorded_reference, reference_is_input,  # noqa: F401
                        release_memory, same_model)

METRICS = ("kl", "top1")


# ---------------------------------------------------------------- on windows (the metrics)


def windows_meta(windows: Calibration) -> dict[str, Any]:
    """What a reference cache on ``windows`` records and is checked against when reused."""
    keep = ("source", "seq_len", "num_windows", "special_prefix", "text_tokens")
    return {"windows": {k: windows.description.get(k) for k in keep},
            "windows_sha256": tokens_sha256(windows.input_ids, windows.attention_mask)}


@torch.inference_mode()
def write_reference(cache: DistributionCache, start: int, model: nn.Module, hidden: torch.Tensor,
                    ids: torch.Tensor, mask: torch.Tensor, first_target: int, chunk_tokens: int = 512) -> int:
    """Store the reference rows of one batch's predicted tokens (from its final states); the next position."""
    states, _ = prediction_pairs(hidden, ids, mask, first_target)
    for _, logits in chunked_logits(model, states, chunk_tokens):
        start = cache.write(start, rows_from_logits(logits, cache.top_k))
    return start


@dataclass
class DivergenceSums:
    """Sums over predicted tokens: KL(reference || model), same-argmax count, NLL, token count."""

    kl: float = 0.0
    same_top1: int = 0
    nll: float = 0.0
    tokens: int = 0

    def add(self, other: "DivergenceSums") -> "DivergenceSums":
        return DivergenceSums(self.kl + other.kl, self.same_top1 + other.same_top1, self.nll + other.nll,
                              self.tokens + other.tokens)


@torch.inference_mode()
def divergence_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   first_target: int, reference: DistributionCache, start: int,
                   chunk_tokens: int = 512) -> DivergenceSums:
    """KL, top-1 agreement and NLL sums of one batch given its final states, against ``reference`` rows
    ``start..`` (the batch's predicted tokens in order); the LM head runs once per chunk for all three."""
    states, targets = prediction_pairs(hidden, ids, mask, first_target)
    if start + targets.numel() > len(reference):
        raise DivergenceError(f"the reference cache holds {len(reference)} positions, fewer than these windows "
                              "predict; it was built on other windows")
    sums = DivergenceSums(tokens=int(targets.numel()))
    for part, logits in chunked_logits(model, states, chunk_tokens):
        rows = reference.take(slice(start + part.start, start + min(part.stop, len(targets))), logits.device)
        log_q = F.log_softmax(logits, dim=-1)
        sums.kl += float(kl_per_token(log_q, rows).sum())
        sums.same_top1 += int((logits.argmax(dim=-1) == rows.top1).sum())
        sums.nll += float(F.cross_entropy(logits, targets[part], reduction="sum"))
    return sums


@dataclass
class DivergenceResult:
    """Mean per-token KL(reference || model) and top-1 agreement, and how they were measured."""

    kl: float
    top1: float
    tokens: int
    windows: int
    seq_len: int
    source: str
    reference: str | None
    cache: str
    approximate: bool
    top_k: int | None
    metrics: tuple[str, ...] = METRICS
    domains: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each named text's kl, top1 and tokens; the headline kl and top1 are their means (one weight per text)."""

    def values(self) -> dict[str, float]:
        """The metrics asked for (both are measured in one pass, only these are reported): the means, then
        ``kl/NAME`` per text."""
        return {**{name: getattr(self, name) for name in self.metrics},
                **{f"{name}/{domain}": d[name] for name in self.metrics for domain, d in self.domains.items()}}

    @property
    def note(self) -> str:
        return (f"kl is a lower bound: the reference's top-{self.top_k} tokens + one remainder bucket"
                if self.approximate else "")

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "note": self.note}


def check_comparable(reference: DistributionCache, model: nn.Module, windows: Calibration) -> None:
    """The model must share the reference's vocabulary and tokenize the windows to the same ids."""
    where = reference.meta.get("reference") or "the reference"
    vocab = vocab_size_of(model)
    if vocab != reference.vocab_size:
        raise DivergenceError(f"{where} has a vocabulary of {reference.vocab_size:,} tokens and this model "
                              f"{vocab:,}: KL needs the same tokenizer; pass --reference with the dense model "
                              "this one was made from")
    if reference.meta.get("windows_sha256") != windows_meta(windows)["windows_sha256"]:
        raise DivergenceError(f"{where} was measured on other tokens than these windows (another tokenizer, or "
                              "other --ppl-data/--ppl-windows/--seq-len); rebuild the reference cache")


def measure_divergence(model: "nn.Module | Backend", windows: Calibration, reference: DistributionCache, *,
                       batch_size: int = 8, chunk_tokens: int = 512, progress: bool = True,
                       ) -> tuple[DivergenceResult, PerplexityResult]:
    """KL and top-1 agreement against ``reference`` on ``windows``, and perplexity from the same pass;
    ``model`` is a model or a :class:`~depthprune.backend.Backend` (streamed: one layer at a time)."""
    backend = InMemoryBackend.of(model)
    check_comparable(reference, backend.model, windows)
    first = first_target_of(windows)
    batches = batches_of(windows, batch_size)
    spans = batch_spans(windows, batches)
    sums = {name: DivergenceSums() for name, _, _ in windows.domains()}
    start = 0

    def on_output(b: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> None:
        nonlocal start
        hidden = backend.final_states(ids, mask, last)
        for name, rows in spans[b]:
            part = divergence_sum(backend.model, hidden[rows], ids[rows], mask[rows], first, reference, start,
                                  chunk_tokens)
            sums[name], start = sums[name].add(part), start + part.tokens

    walk_layers(backend, batches, on_output=on_output, head=True, progress=progress, desc="kl / top1")
    empty = [name or "the text" for name, total in sums.items() if total.tokens == 0]
    if empty:
        raise InputError(f"KL over zero predicted tokens means nothing: {', '.join(empty)} gave no window with a "
                         "target token; use a longer text or a smaller --seq-len")
    means = {name: {"kl": t.kl / t.tokens, "top1": t.same_top1 / t.tokens, "nll": t.nll / t.tokens,
                    "tokens": t.tokens} for name, t in sums.items()}
    named, mean = per_domain(means, lambda parts: {
        key: sum(p[key] for p in parts) / (1 if key == "tokens" else len(parts)) for key in parts[0]})
    common = dict(tokens=int(mean["tokens"]), windows=windows.num_windows, seq_len=int(windows.input_ids.shape[1]),
                  source=str(windows.description.get("source")))
    domains = {n: {"kl": d["kl"], "top1": d["top1"], "tokens": d["tokens"]} for n, d in named.items()}
    return (DivergenceResult(kl=mean["kl"], top1=mean["top1"], **common,
                             reference=reference.meta.get("reference"), cache=reference.describe(),
                             approximate=reference.approximate, top_k=reference.top_k, domains=domains),
            PerplexityResult(perplexity=math.exp(mean["nll"]), nll=mean["nll"], **common,
                             domains={n: {"perplexity": math.exp(d["nll"]), "nll": d["nll"], "tokens": d["tokens"]}
                                      for n, d in named.items()}))


def build_reference(model: "nn.Module | Backend", windows: Calibration, *, source: str | None = None,
                    top_k: int = DEFAULT_TOP_K, exact_budget_mb: float = EXACT_BUDGET_MB, batch_size: int = 8,
                    chunk_tokens: int = 512, progress: bool = True) -> DistributionCache:
    """The reference ``model``'s distributions at every predicted position of ``windows`` (one decoder pass;
    a model or a backend)."""
    backend = InMemoryBackend.of(model)
    first = first_target_of(windows)
    tokens = int(windows.attention_mask[:, first:].sum())
    vocab = vocab_size_of(backend.model)
    cache = DistributionCache.allocate(tokens, vocab, choose_top_k(tokens, vocab, top_k, exact_budget_mb),
                                       {"reference": source, **windows_meta(windows), "first_target": first})
    start = 0

    def on_output(b: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> None:
        nonlocal start
        start = write_reference(cache, start, backend.model, backend.final_states(ids, mask, last), ids, mask,
                                first, chunk_tokens)

    walk_layers(backend, batches_of(windows, batch_size), on_output=on_output, head=True, progress=progress,
                desc="reference cache")
    assert start == tokens, (start, tokens)
    return cache


__all__ = [
    "METRICS",
    "CachedRows",
    "DistributionCache",
    "DivergenceError",
    "DivergenceResult",
    "DivergenceSums",
    "build_reference",
    "check_comparable",
    "divergence_sum",
    "kl_per_token",
    "measure_divergence",
    "renormalised_kl_per_token",
    "rows_from_logits",
    "write_reference",
]
