"""Next-token loss of candidate stacks on calibration windows: what SLEB minimises and how plans are ranked.

Objectives, both averaged over every predicted calibration token:

``nll``  next-token negative log-likelihood of the candidate (SLEB, arXiv 2402.09025);
``kl``   KL(dense || candidate) between the original model's and the candidate's next-token
         distributions (EvoPress, arXiv 2410.14649): it asks the candidate to behave like the
         model it came from, not just to predict the text.

Candidates are evaluated with a :class:`~depthprune.backend.walk.Walker` (cached states, only the
candidates' own layers run, no model copy, all candidates of one call in one walk, so a streamed model reads
each layer once per call) and the LM head applied a chunk of tokens at a time. For ``kl`` the dense model's
distributions are cached once: exactly when they fit ``teacher_cache_mb``, else (very large vocabularies) its
top-k tokens plus the remainder mass, which makes the objective a lower bound of the KL (the engine's
``teacher_note`` says which, and the plans record it).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import Calibration
from ..errors import InputError
from ..backend import InMemoryBackend, Stack, Walker, count_work
from ..evaluate.divergence import write_reference
from ..evaluate.distributions import (DEFAULT_TOP_K, EXACT_BUDGET_MB, CachedRows, DistributionCache, choose_top_k,
                                      kl_per_token, vocab_size_of)
from ..evaluate.perplexity import chunked_logits, first_target_of, prediction_pairs
from ..models.forward import batches_of

OBJECTIVES = ("nll", "kl")


@torch.inference_mode()
def objective_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  first_target: int, chunk_tokens: int = 512,
                  teacher: CachedRows | None = None) -> tuple[float, int]:
    """Summed objective over one batch's predicted tokens given its final states, and their count: next-token
    NLL, or KL(teacher || model) when the dense model's distributions at those tokens (``teacher``: exact, or
    its top k + remainder, see :mod:`depthprune.evaluate.divergence`) are given."""
    states, targets = prediction_pairs(hidden, ids, mask, first_target)
    total = 0.0
    for part, logits in chunked_logits(model, states, chunk_tokens):
        if teacher is None:
            total += float(F.cross_entropy(logits, targets[part], reduction="sum"))
        else:
            rows = teacher.select(slice(part.start, min(part.stop, len(teacher))))
            total += float(kl_per_token(F.log_softmax(logits, dim=-1), rows).sum())
    return total, int(targets.numel())


class LossEngine:
    """Calibration loss of candidate stacks built from the original model's layers (and merged or patched ones).

    ``model`` is a model or a :class:`~depthprune.backend.Backend`; ``sets`` is how many candidates one call of
    :meth:`losses` evaluates at most (for a streamed model's memory plan). Close the engine (or use it as a
    context manager) to free a streamed model's spilled states.
    """

    def __init__(self, model, calibration: Calibration, *, objective: str = "nll", batch_size: int | None = None,
                 chunk_tokens: int = 512, teacher_cache_mb: float = EXACT_BUDGET_MB,
                 teacher_top_k: int = DEFAULT_TOP_K, sets: int = 1, progress: bool = False) -> None:
        if objective not in OBJECTIVES:
            raise InputError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.backend = InMemoryBackend.of(model)
        self.model = self.backend.model
        self.spec = self.backend.spec
        self.objective = objective
        self.chunk_tokens = chunk_tokens
        self.layers: list[nn.Module] = list(self.backend.layers)
        self.num_layers = len(self.layers)
        self.first_target = first_target_of(calibration)
        self.num_windows = calibration.num_windows
        self.head = self.backend.head_cost()
        self.walker = Walker(self.backend, batches_of(calibration, batch_size), sets=sets + 2, head=True)
        self.batches = self.walker.batches
        self.evaluations = 0
        self.teacher: DistributionCache | None = None
        try:
            self.walker.run({"dense": Stack(self.layers)}, progress=progress, desc="dense states")
            if objective == "kl":
                self.teacher = self._teacher_cache(teacher_cache_mb, teacher_top_k)
            self.dense_loss = self._mean_losses(["dense"])["dense"]
        except BaseException:
            self.walker.close()
            raise

    @torch.inference_mode()
    def _teacher_cache(self, budget_mb: float, top_k: int) -> DistributionCache:
        """The dense model's distributions at every predicted token, once: exact when they fit ``budget_mb``,
        else its ``top_k`` tokens + the remainder (then the kl objective is a lower bound, and
        :attr:`teacher_note` says so)."""
        counts = [int(mask[:, self.first_target:].sum()) for _, mask in self.batches]
        vocab = vocab_size_of(self.model)
        cache = DistributionCache.allocate(sum(counts), vocab, choose_top_k(sum(counts), vocab, top_k, budget_mb),
                                           {"reference": "the dense model"})
        self._offsets = [sum(counts[:b]) for b in range(len(counts) + 1)]
        with self.backend.outside(head=True):
            for b, (ids, mask) in enumerate(self.batches):
                final = self.backend.final_states(ids, mask, self.walker.state("dense", b))
                write_reference(cache, self._offsets[b], self.model, final, ids, mask, self.first_target,
                                self.chunk_tokens)
        return cache

    @property
    def teacher_note(self) -> str | None:
        """How the kl objective's teacher is held: exact, or the approximation used (for the plan's record)."""
        if self.teacher is None:
            return None
        return ("exact" if not self.teacher.approximate else
                f"the dense model's top-{self.teacher.top_k} tokens + one remainder bucket (a lower bound of the KL)")

    def close(self) -> None:
        self.walker.close()

    def __enter__(self) -> "LossEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.inference_mode()
    def _mean_losses(self, keys: Sequence[Hashable]) -> dict[Hashable, float]:
        """Each stack's mean objective from its states in the walker (kl: against the dense model's cached
        distributions)."""
        sums = {key: [0.0, 0] for key in keys}
        with self.backend.outside(head=True):
            for b, (ids, mask) in enumerate(self.batches):
                teacher = None
                if self.teacher is not None:
                    teacher = self.teacher.take(slice(self._offsets[b], self._offsets[b + 1]), ids.device)
                for key in keys:
                    count_work(self.head * ids.shape[0])
                    hidden = self.backend.final_states(ids, mask, self.walker.state(key, b))
                    t, c = objective_sum(self.model, hidden, ids, mask, self.first_target, self.chunk_tokens,
                                         teacher)
                    sums[key][0] += t
                    sums[key][1] += c
        return {key: total / count for key, (total, count) in sums.items()}

    def losses(self, stacks: dict[Hashable, Stack], keys: Sequence[Hashable] | None = None, *,
               progress: bool | None = None, desc: str = "candidates") -> dict[Hashable, float]:
        """Mean objective of each stack in ``stacks`` (only of ``keys``, when given: the others are there to be
        forked from), all run in one walk."""
        self.walker.run(stacks, progress=progress, desc=desc)
        keys = list(stacks) if keys is None else list(keys)
        self.evaluations += len(keys)
        return self._mean_losses(keys)

    def loss(self, modules: Sequence[nn.Module]) -> float:
        """Mean objective of one candidate stack run from the input (the model's layers replaced by ``modules``)."""
        return self.losses({"candidate": Stack(modules)})["candidate"]
