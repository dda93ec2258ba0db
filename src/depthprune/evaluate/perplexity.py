"""Perplexity on non-overlapping windows (the papers' protocol: 128-token windows).

The decoder runs once per batch; logits are then formed a chunk of tokens at a
time, so a 262k-vocabulary model never holds full logits for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import Backend, InMemoryBackend, walk_layers
from ..checks import require_finite_result
from ..data.calibration import Calibration, consecutive_windows
from ..errors import InputError
from ..models.forward import batches_of


PPL_DATASETS = {"wikitext2": "wikitext2-test", "ptb": "ptb"}


@dataclass
class PerplexityResult:
    """Perplexity over the windows; with several texts (``domains``: each one's perplexity, nll and tokens) the
    headline is their geometric mean, exp(mean of the texts' nll), so no text counts more for being longer."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    source: str
    details: dict[str, Any] = field(default_factory=dict)
    domains: dict[str, dict[str, float]] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        return {"perplexity": self.perplexity,
                **{f"perplexity/{name}": d["perplexity"] for name, d in self.domains.items()}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_spans(windows: Calibration, batches: list[tuple[torch.Tensor, torch.Tensor]]
                ) -> list[list[tuple[str, slice]]]:
    """For each batch, the rows of each text's windows in it: (domain, rows) in order, so per-text sums come
    out of one pass over all the windows."""
    out, start = [], 0
    for ids, _ in batches:
        end = start + ids.shape[0]
        out.append([(name, slice(max(lo, start) - start, min(hi, end) - start))
                    for name, lo, hi in windows.domains() if max(lo, start) < min(hi, end)])
        start = end
    return out


def per_domain(sums: dict[str, Any], combine: Any) -> tuple[dict[str, dict[str, float]], Any]:
    """Each named text's result, and the result over all of them: ``combine(named sums)`` (one unnamed text:
    its own sums, and no per-text entries)."""
    if list(sums) == [""]:
        return {}, sums[""]
    return {name: value for name, value in sums.items()}, combine(list(sums.values()))


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's LM head does to final hidden states, soft-capping included (Gemma)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def prediction_pairs(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     first_target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, hidden) final states that predict a real token, and the N tokens they predict.

    Padding is never a target, and neither is the special prefix (BOS): the
    first real token is predicted from BOS when there is one.
    """
    h = hidden[:, first_target - 1 : -1]
    targets = ids[:, first_target:].to(h.device)
    valid = mask[:, first_target:].bool().to(h.device)
    return h[valid], targets[valid]


def chunked_logits(model: nn.Module, states: torch.Tensor,
                   chunk_tokens: int = 512) -> Iterator[tuple[slice, torch.Tensor]]:
    """float32 logits of ``states`` a chunk of tokens at a time: full-vocabulary logits for a whole batch
    never exist at once (262k-token vocabularies make them gigabytes)."""
    for start in range(0, states.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        yield part, logits_from_hidden(model, states[part]).float()


def nll_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, first_target: int,
            chunk_tokens: int = 512) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over every predicted token, and their number."""
    states, targets = prediction_pairs(hidden, ids, mask, first_target)
    total = sum(float(F.cross_entropy(logits, targets[part], reduction="sum"))
                for part, logits in chunked_logits(model, states, chunk_tokens))
    return total, int(targets.numel())


def first_target_of(windows: Calibration) -> int:
    """Position of the first predicted token: after BOS or any other special prefix (which is context, never
    a target); refuses windows that leave nothing to predict."""
    first = max(1, len(windows.description.get("special_prefix", [])))
    if windows.input_ids.shape[1] <= first:
        raise InputError(f"windows of {windows.input_ids.shape[1]} tokens leave nothing to predict after the "
                         "special prefix; use --seq-len 2 or more (the papers use 128)")
    return first


@torch.inference_mode()
def perplexity_on(
    model: "nn.Module | Backend",
    windows: Calibration,
    *,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` (a model or a :class:`~depthprune.backend.Backend`) on prepared windows.

    Tokens of the special prefix (BOS) are context, never targets; the first
    real token of each window is predicted from BOS when there is one.
    """
    backend = InMemoryBackend.of(model)
    first_target = first_target_of(windows)
    batches = batches_of(windows, batch_size)
    spans = batch_spans(windows, batches)
    sums = {name: [0.0, 0] for name, _, _ in windows.domains()}

    def on_output(b: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> None:
        hidden = backend.final_states(ids, mask, last)
        for name, rows in spans[b]:
            t, c = nll_sum(backend.model, hidden[rows], ids[rows], mask[rows], first_target, chunk_tokens)
            sums[name][0] += t
            sums[name][1] += c

    walk_layers(backend, batches, on_output=on_output, head=True, progress=progress, desc="perplexity")
    empty = [name or "the text" for name, (_, count) in sums.items() if count == 0]
    if empty:
        raise InputError(f"perplexity over zero scored tokens means nothing: {', '.join(empty)} gave no window "
                         "with a target token; use a longer text or a smaller --seq-len")
    domains = {name: {"perplexity": math.exp(t / c), "nll": t / c, "tokens": c} for name, (t, c) in sums.items()}
    named, (nll, count) = per_domain(
        {n: (d["nll"], d["tokens"]) for n, d in domains.items()},
        lambda parts: (sum(p[0] for p in parts) / len(parts), sum(p[1] for p in parts)))
    require_finite_result(nll, "the perplexity")
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        windows=windows.num_windows,
        seq_len=int(windows.input_ids.shape[1]),
        source=str(windows.description.get("source")),
        domains={n: domains[n] for n in named},
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
