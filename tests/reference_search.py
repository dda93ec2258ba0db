"""Slow, straightforward SLM and LaCo loops: deep copy + surgery + full forward per candidate.

Independent of depthprune's engine (no cached states, no swapped stacks, no
functional merged layers); it only shares the Plan/surgery code, whose merges
are tested against their formulas separately.
"""

from __future__ import annotations

import copy

import torch

from depthprune import Merge, Plan, apply_plan


def final_states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def similarity(original_final, model, merges, ids, mask, num_layers):
    candidate = copy.deepcopy(model)
    apply_plan(candidate, Plan(method="ref", num_layers=num_layers, merges=merges))
    out = final_states(candidate, ids, mask)
    sims = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        a, c = original_final[b][keep].flatten().double(), out[b][keep].flatten().double()
        sims.append(float(a @ c / (a.norm() * c.norm())))
    return sum(sims) / len(sims)


class CandidateSimilarities:
    """``similarity`` of each candidate merge list to the dense model, each candidate built and run once: the
    searches of a threshold sweep meet the same candidates again. Pass one to several slow_slm/slow_laco calls."""

    def __init__(self, model, ids, mask, num_layers):
        self.model, self.ids, self.mask, self.num_layers = model, ids, mask, num_layers
        self.orig = final_states(model, ids, mask)
        self.seen: dict[tuple[Merge, ...], float] = {}

    def __call__(self, merges: list[Merge]) -> float:
        key = tuple(merges)
        if key not in self.seen:
            self.seen[key] = similarity(self.orig, self.model, merges, self.ids, self.mask, self.num_layers)
        return self.seen[key]


def slow_slm(model, ids, mask, threshold, operator, num_layers, sims: CandidateSimilarities | None = None):
    """Returns the plan's merges for final_window="commit" and for "skip" (the released code)."""
    sims = sims or CandidateSimilarities(model, ids, mask, num_layers)
    merges: list[Merge] = []
    high, low = num_layers - 2, num_layers - 3
    passing = False
    while low >= 0:
        sim = sims(merges + [Merge(low, high, operator)])
        if sim > threshold:
            low -= 1
            passing = True
        elif low + 1 != high:
            merges.append(Merge(low + 1, high, operator))
            high, low = low, low - 1
            passing = False
        else:
            high, low = high - 1, low - 1
            passing = False
    committed = merges + [Merge(0, high, operator)] if passing else merges
    return {"commit": committed, "skip": merges}


def slow_laco(model, ids, mask, threshold, operator, num_layers, merge_layers, interval, lowest, highest,
              sims: CandidateSimilarities | None = None):
    sims = sims or CandidateSimilarities(model, ids, mask, num_layers)
    spans = [(i, i) for i in range(num_layers)]
    merges: list[Merge] = []
    l = highest - merge_layers
    while l >= lowest:
        last = min(l + merge_layers - 1, len(spans) - 1)
        candidate = Merge(spans[l][0], spans[last][1], operator)
        sim = sims(merges + [candidate])
        if sim > threshold:
            merges.append(candidate)
            spans[l : last + 1] = [(candidate.low, candidate.high)]
            l -= interval
        else:
            l -= 1
    return merges


def next_token_loss(model, ids, mask, objective, dense_logprobs=None, first_target=1):
    """Mean nll (or KL from the dense model) over predicted tokens, from a full forward with the LM head."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, first_target - 1 : -1], dim=-1)
    valid = mask[:, first_target:].bool()
    if objective == "nll":
        per_token = -logp.gather(-1, ids[:, first_target:, None])[..., 0]
    else:
        per_token = (dense_logprobs.exp() * (dense_logprobs - logp)).sum(-1)
    return float(per_token[valid].double().mean()), logp


def slow_sleb(model, ids, mask, n_remove, objective, num_layers, first_target=1):
    """SLEB as its paper states it: each round, copy the model without each remaining layer, run it fully,
    keep the removal with the lowest loss."""
    _, dense = next_token_loss(model, ids, mask, "nll", first_target=first_target)
    removed: list[int] = []
    for _ in range(n_remove):
        losses = {}
        for layer in range(num_layers):
            if layer in removed:
                continue
            candidate = copy.deepcopy(model)
            apply_plan(candidate, Plan(method="ref", num_layers=num_layers, remove=removed + [layer]))
            losses[layer], _ = next_token_loss(candidate, ids, mask, objective, dense, first_target)
        removed.append(min(losses, key=lambda i: (losses[i], i)))
    return sorted(removed)
