"""Next-token loss of candidate stacks on calibration windows: what SLEB minimises and how plans are ranked.

Objectives, both averaged over every predicted calibration token:

``nll``  next-token negative log-likelihood of the candidate (SLEB, arXiv 2402.09025);
``kl``   KL(dense || candidate) between the original model's and the candidate's next-token
         distributions (EvoPress, arXiv 2410.14649): it asks the candidate to behave like the
         model it came from, not just to predict the text.

Candidates are evaluated with a :class:`~depthprune.backend.walk.Walker` (cached states, only the
candidates' own layers run, no model copy, all candidates of one call in one walk, so a streamed model reads
each layer once per call) and the LM head applied a chunk of tokens at a time. For ``kl`` the dense model's
log-probabilities are cached when they fit in ``teacher_cache_mb`` and recomputed from its cached final
states otherwise.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import Calibration
from ..errors import InputError
from ..backend import InMemoryBackend, Stack, Walker
from ..evaluate.perplexity import chunked_logits, first_target_of, prediction_pairs
from ..models.forward import batches_of

OBJECTIVES = ("nll", "kl")


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
    """Calibration loss of candidate stacks built from the original model's layers (and merged or patched ones).

    ``model`` is a model or a :class:`~depthprune.backend.Backend`; ``sets`` is how many candidates one call of
    :meth:`losses` evaluates at most (for a streamed model's memory plan). Close the engine (or use it as a
    context manager) to free a streamed model's spilled states.
    """

    def __init__(self, model, calibration: Calibration, *, objective: str = "nll", batch_size: int | None = None,
                 chunk_tokens: int = 512, teacher_cache_mb: float = 1024, sets: int = 1,
                 progress: bool = False) -> None:
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
        self.walker = Walker(self.backend, batches_of(calibration, batch_size), sets=sets + 2, head=True)
        self.batches = self.walker.batches
        self.evaluations = 0
        self._teacher: list[torch.Tensor] | None = None
        try:
            self.walker.run({"dense": Stack(self.layers)}, progress=progress, desc="dense states")
            if objective == "kl":
                tokens = sum(int(mask[:, self.first_target:].sum()) for _, mask in self.batches)
                vocab = self.model.get_output_embeddings().weight.shape[0]
                if tokens * vocab * 4 / 2**20 <= teacher_cache_mb:
                    with self.backend.outside(head=True):
                        self._teacher = [self._teacher_logprobs(b) for b in range(len(self.batches))]
            self.dense_loss = self._mean_losses(["dense"])["dense"]
        except BaseException:
            self.walker.close()
            raise

    def close(self) -> None:
        self.walker.close()

    def __enter__(self) -> "LossEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.inference_mode()
    def _teacher_logprobs(self, b: int) -> torch.Tensor:
        ids, mask = self.batches[b]
        final = self.backend.final_states(ids, mask, self.walker.state("dense", b))
        return teacher_logprobs(self.model, final, ids, mask, self.first_target, self.chunk_tokens)

    @torch.inference_mode()
    def _mean_losses(self, keys: Sequence[Hashable]) -> dict[Hashable, float]:
        """Each stack's mean objective from its states in the walker; the dense model's log-probabilities are
        formed once per batch for all stacks when they are not cached."""
        sums = {key: [0.0, 0] for key in keys}
        with self.backend.outside(head=True):
            for b, (ids, mask) in enumerate(self.batches):
                teacher = None
                if self.objective == "kl":
                    teacher = self._teacher[b] if self._teacher is not None else self._teacher_logprobs(b)
                for key in keys:
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
