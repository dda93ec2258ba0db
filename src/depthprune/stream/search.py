"""The searches by streaming: SLEB (layer-major rounds) and SLM/LaCo (a similarity engine reading layers).

**SLEB.** Every layer read once per round, all candidates advanced together.

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
per candidate (spilled to disk when they exceed the memory budget).

**SLM and LaCo.** Their searches are sequential (each decision changes the next
candidate), so :class:`StreamedSimilarityEngine` answers the in-memory
engine's question one candidate at a time: from the stored original states
entering the candidate's lowest layer, each candidate layer in turn is read
(a merged window: its member layers together, merged in memory as in the
in-memory engine), run over every batch and freed; then the final norm, and
the cosine to the original final states. The search code itself is the
in-memory one.

Layers run with the calls the model's own forward makes (masks, rotary
embeddings, the layer's own attention type), so losses, similarities and
therefore plans are those of the in-memory searches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..engine.merged import MergedLayer, PatchedLayer
from ..engine.search import flat_cosine
from ..engine.loss import OBJECTIVES, first_target_of, objective_sum, teacher_logprobs
from ..errors import InputError
from ..methods.sleb import SLEBOptions, log_round, removable_layers, sleb_plan
from ..models.arch import per_layer_config_values
from ..models.forward import batches_of
from ..plan import Plan
from .model import LayerCall, StreamedModel
from .passes import states_store
from .states import StateStore

Report = Any


def record_calls(sm: StreamedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 store: StateStore) -> list[list[LayerCall]]:
    """Every layer's call for every batch (kept for the whole search: masks and rotary embeddings, no states);
    the states entering layer 0 go to ``store`` under ``("input", b)``."""
    calls = []
    with sm.outside():
        for b, (ids, mask) in enumerate(batches):
            h0, layer_calls = sm.layer_calls(ids, mask, sm.num_layers - 1)
            store.put(("input", b), h0)
            calls.append(layer_calls)
    return calls


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
    with states_store(sm, calibration, max_memory, scratch, sets=len(removable) + 3, head=True,
                      report=report) as store, torch.inference_mode():
        calls = record_calls(sm, batches, store)

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

        def mean_losses(keys: list[Any], teacher: bool) -> dict[Any, float]:
            """Each key's mean objective; the dense log-probabilities computed once per batch for all keys."""
            sums = {key: [0.0, 0] for key in keys}
            for b, (ids, mask) in enumerate(batches):
                dense = None
                if teacher:
                    final = sm.final_states(ids, mask, store.get(("dense", b)).to(sm.device))
                    dense = teacher_logprobs(sm.model, final, ids, mask, first_target, chunk_tokens)
                for key in keys:
                    hidden = sm.final_states(ids, mask, store.get((key, b)).to(sm.device))
                    t, c = objective_sum(sm.model, hidden, ids, mask, first_target, chunk_tokens, dense)
                    sums[key][0] += t
                    sums[key][1] += c
            return {key: total / count for key, (total, count) in sums.items()}

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
                        dense_loss = mean_losses(["dense"], kl)["dense"]
                    losses = mean_losses(candidates, kl)
                evaluations += len(losses)
                current.remove(log_round(log, losses))
                bar.set_postfix(round=round_ + 1, removed=log[-1]["removed"], loss=f"{log[-1]['loss']:.4f}")
    return sleb_plan(L, current, log, objective=options.objective, n_remove=n_remove,
                     protect_first=options.protect_first, protect_last=options.protect_last, dense_loss=dense_loss,
                     evaluations=evaluations)


def _originals(module: nn.Module) -> list[nn.Module]:
    """The original (skeleton) layers a candidate layer is made from, in order."""
    if isinstance(module, MergedLayer):
        return [layer for member in module.members for layer in _originals(member)]
    if isinstance(module, PatchedLayer):
        return _originals(module.inner)
    return [module]


class StreamedSimilarityEngine:
    """:class:`~depthprune.engine.search.SimilarityEngine`'s interface over a streamed model.

    Holds the original model's states entering every layer and its final states (one set per layer, spilled
    to disk when over the budget), and every layer's recorded call; a candidate reads only its own layers.
    """

    def __init__(self, sm: StreamedModel, calibration: Calibration, *, batch_size: int | None = None,
                 progress: bool = True, max_memory: int | None = None, scratch: Path | None = None,
                 report: Report | None = None) -> None:
        self.sm = sm
        self.spec = sm.spec
        self.layers: list[nn.Module] = list(sm.layers)
        self.num_layers = len(self.layers)
        self.evaluations = 0
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._per_layer = per_layer_config_values(sm.config, self.spec)
        self.batches = [(ids.to(sm.device), mask.to(sm.device)) for ids, mask in batches_of(calibration, batch_size)]
        self._store = states_store(sm, calibration, max_memory, scratch, sets=self.num_layers + 2, report=report)
        try:
            self._calls = record_calls(sm, self.batches, self._store)
            self._walk_original(progress)
        except BaseException:
            self._store.close()
            raise

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "StreamedSimilarityEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.inference_mode()
    def _walk_original(self, progress: bool) -> None:
        store = self._store
        for b in range(len(self.batches)):
            store.put(("enter", 0, b), store.get(("input", b)))
        for i in tqdm(range(self.num_layers), desc="original states (streamed)", unit="layer",
                      disable=not progress):
            with self.sm.layer(i) as layer:
                for b in range(len(self.batches)):
                    h = self._calls[b][i](layer, store.get(("enter", i, b)).to(self.sm.device))
                    store.put(("enter", i + 1, b), h)
        self.reference = self._finals(("enter", self.num_layers))

    def _finals(self, key: tuple) -> list[torch.Tensor]:
        with self.sm.outside():
            return [self.sm.final_states(ids, mask, self._store.get((*key, b)).to(self.sm.device)).cpu()
                    for b, (ids, mask) in enumerate(self.batches)]

    def original_per_layer(self, indices: list[int]) -> dict[str, list]:
        """Per-layer config entries of original ``indices`` (what the in-memory engine's stacks carry)."""
        return {name: [entries[i] for i in indices] for name, entries in self._per_layer.items()}

    @torch.inference_mode()
    def similarity(self, start: int, modules: list[nn.Module], per_layer: dict[str, list]) -> float:
        """Mean over samples of cos(original final states, candidate final states), as in memory: the
        original layers below ``start``, then ``modules`` (each run with the call of its lowest layer)."""
        self.evaluations += 1
        sm, store = self.sm, self._store
        for b in range(len(self.batches)):
            store.put(("candidate", b), store.get(("enter", start, b)))
        for module in modules:
            members = _originals(module)
            names = [name for layer in members for name in sm.layer_param_names(self._index[id(layer)])]
            first = self._index[id(members[0])]
            with sm.materialized(names):
                try:
                    for b in range(len(self.batches)):
                        h = self._calls[b][first](module, store.get(("candidate", b)).to(sm.device))
                        store.put(("candidate", b), h)
                finally:
                    if isinstance(module, (MergedLayer, PatchedLayer)):
                        module.release()
        finals = self._finals(("candidate",))
        sims = [s for b, final in enumerate(finals)
                for s in flat_cosine(self.reference[b], final, self.batches[b][1])]
        return float(sum(sims) / len(sims))
