"""SLEB's greedy search by streaming: every layer read once per round, all candidates advanced together.

The in-memory search (:func:`depthprune.methods.sleb.sleb_search`) evaluates
one candidate at a time, each running the layers above its position. Streamed,
that order would read the upper layers from disk once per candidate. Turned
layer-major, one round is a single walk up the current model::

    ref = states entering the current model's first layer
    for each layer j of the current model, bottom to top (j read from disk once):
        every open candidate's states  <- j(states)        # candidates removed a layer below j
        open candidate "without j" with states = ref       # it skips j
        ref <- j(ref)
    loss of each candidate = objective(final norm + LM head of its states)

so a round reads each kept layer once and holds one set of calibration states
per candidate (spilled to disk when they exceed the memory budget). Layers run
with the calls the model's own forward makes (masks, rotary embeddings, the
layer's own attention type), so losses, and therefore plans, are those of the
in-memory search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..engine.loss import OBJECTIVES, first_target_of, objective_sum, teacher_logprobs
from ..errors import InputError
from ..methods.sleb import SLEBOptions, log_round, removable_layers, sleb_plan
from ..models.forward import batches_of
from ..plan import Plan
from .model import StreamedModel
from .passes import memory_plan, open_store

Report = Any


def streamed_sleb(
    sm: StreamedModel,
    calibration: Calibration,
    n_remove: int,
    options: SLEBOptions,
    *,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    progress: bool = True,
    max_memory: int | None = None,
    scratch: Path | None = None,
    report: Report | None = None,
) -> Plan:
    """The plan :func:`~depthprune.methods.sleb.sleb_search` makes, one decoder layer in memory at a time."""
    if options.objective not in OBJECTIVES:
        raise InputError(f"unknown objective {options.objective!r}: use one of {', '.join(OBJECTIVES)}")
    L = sm.num_layers
    removable = removable_layers(L, n_remove, options.protect_first, options.protect_last)
    first_target = first_target_of(calibration)
    batches = [(ids.to(sm.device), mask.to(sm.device)) for ids, mask in batches_of(calibration, batch_size)]
    # at the peak: one set of states per candidate, the reference, the input and the dense final states
    budget = memory_plan(sm, calibration.num_windows * (len(removable) + 3), int(calibration.input_ids.shape[1]),
                         max_memory=max_memory, head=True)
    if report is not None:
        report(budget.describe())

    with open_store(budget, scratch) as store, torch.inference_mode():
        with sm.outside():
            calls = []
            for b, (ids, mask) in enumerate(batches):
                h0, layer_calls = sm.layer_calls(ids, mask, L - 1)
                store.put(("input", b), h0)
                calls.append(layer_calls)

        def walk(current: list[int], bar: tqdm) -> list[int]:
            """One round: the reference's and every candidate's final-layer states end in the store."""
            for b in range(len(batches)):
                store.put(("ref", b), store.get(("input", b)))
            open_: list[int] = []
            for j in current:
                with sm.layer(j) as layer:
                    for b in range(len(batches)):
                        run = calls[b][j]
                        for c in open_:
                            store.put((c, b), run(layer, store.get((c, b)).to(sm.device)))
                        ref = store.get(("ref", b)).to(sm.device)
                        if j in removable:
                            store.put((j, b), ref)
                        store.put(("ref", b), run(layer, ref))
                if j in removable:
                    open_.append(j)
                bar.update(1)
            return open_

        def mean_loss(key: Any, teacher: bool) -> float:
            total, count = 0.0, 0
            for b, (ids, mask) in enumerate(batches):
                hidden = sm.final_states(ids, mask, store.get((key, b)).to(sm.device))
                dense = None
                if teacher:
                    final = sm.final_states(ids, mask, store.get(("dense", b)).to(sm.device))
                    dense = teacher_logprobs(sm.model, final, ids, mask, first_target, chunk_tokens)
                t, c = objective_sum(sm.model, hidden, ids, mask, first_target, chunk_tokens, dense)
                total, count = total + t, count + c
            return total / count

        current = list(range(L))
        log: list[dict[str, Any]] = []
        kl = options.objective == "kl"
        dense_loss, evaluations = 0.0, 0
        steps = sum(L - r for r in range(n_remove))
        with tqdm(total=steps, desc="sleb (streamed)", unit="layer", disable=not progress) as bar:
            for round_ in range(n_remove):
                candidates = walk(current, bar)
                with sm.outside(head=True):
                    if round_ == 0:
                        for b in range(len(batches)):
                            store.put(("dense", b), store.get(("ref", b)))
                        dense_loss = mean_loss("dense", kl)
                    losses = {c: mean_loss(c, kl) for c in candidates}
                evaluations += len(losses)
                current.remove(log_round(log, losses))
                bar.set_postfix(round=round_ + 1, removed=log[-1]["removed"], loss=f"{log[-1]['loss']:.4f}")
    return sleb_plan(L, current, log, objective=options.objective, n_remove=n_remove,
                     protect_first=options.protect_first, protect_last=options.protect_last, dense_loss=dense_loss,
                     evaluations=evaluations)
