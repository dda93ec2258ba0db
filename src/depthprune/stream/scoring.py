"""Layer statistics (BI, angular), CKA and perplexity by streaming: the same numbers as in memory.

Each function mirrors its in-memory counterpart operation for operation
(:func:`depthprune.analysis.stats.layer_statistics`,
:func:`depthprune.analysis.layer_cka.layer_similarity`,
:func:`depthprune.evaluate.perplexity.perplexity_on`) on the same batches in
the same order; only the loop order (layer-major) differs, so results are
equal, not merely close.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..analysis.cka import MinibatchCKA, _check_example_count
from ..analysis.layer_cka import LayerSimilarity
from ..analysis.stats import LayerStats, last_token_index
from ..data.calibration import Calibration
from ..errors import InputError
from ..evaluate.perplexity import PerplexityResult, nll_sum
from ..models.forward import batches_of
from .model import StreamedModel
from .passes import states_store, walk_layers


def streamed_layer_statistics(
    sm: StreamedModel,
    calibration: Calibration,
    *,
    batch_size: int = 8,
    progress: bool = True,
    max_memory: int | None = None,
    scratch: Path | None = None,
    report=None,
) -> LayerStats:
    """BI and last-token states of every layer (see :class:`LayerStats`), one layer in memory at a time.

    ``report(message)`` is told how the memory was planned (states in memory or spilled to ``scratch``).
    """
    n_layers = sm.num_layers
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    last_states: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]
    picks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def last_tokens(b: int, h: torch.Tensor) -> torch.Tensor:
        _, last, rows = picks[b]
        return h[rows.to(h.device), last.to(h.device)].float().cpu()

    def on_input(b: int, ids: torch.Tensor, mask: torch.Tensor, h0: torch.Tensor) -> None:
        picks[b] = (mask.float(), last_token_index(mask), torch.arange(ids.shape[0]))
        last_states[0].append(last_tokens(b, h0))

    def on_layer(i: int, b: int, mask: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        cos_sum[i] += float((cos * picks[b][0].to(h_out.device)).sum())
        last_states[i + 1].append(last_tokens(b, h_out))

    with states_store(sm, calibration, max_memory, scratch, report=report) as store:
        batches = walk_layers(sm, calibration, store, batch_size=batch_size, on_input=on_input,
                              on_layer=on_layer, progress=progress, desc="scoring layers (streamed)")
    total_tokens = sum(int(mask.sum()) for _, mask in batches)
    bi = (1.0 - cos_sum / max(total_tokens, 1)).tolist()
    stacked = torch.stack([torch.cat(s) for s in last_states])
    return LayerStats(bi=bi, last_token_states=stacked, tokens=total_tokens, calibration=calibration.to_dict())


def streamed_layer_similarity(
    sm: StreamedModel,
    calibration: Calibration,
    *,
    kernel: str = "linear",
    batch_size: int = 2,
    progress: bool = True,
    max_memory: int | None = None,
    scratch: Path | None = None,
    report=None,
) -> LayerSimilarity:
    """CKA between the outputs of every pair of layers, one layer in memory at a time.

    Each layer's kernel on each minibatch (n x n, float64, n = the minibatch's real tokens) is kept until
    every layer has one; they count towards the memory plan and spill with the states.
    """
    cka = MinibatchCKA(kernel=kernel)
    tokens_per_batch = [int(mask.sum()) for _, mask in batches_of(calibration, batch_size)]
    for n in tokens_per_batch:
        _check_example_count(n)  # before any layer is read, as the in-memory path fails on its first batch
    kernel_bytes = sm.num_layers * sum(n * n * 8 for n in tokens_per_batch)

    with states_store(sm, calibration, max_memory, scratch, extra=kernel_bytes, report=report) as store:
        def on_layer(i: int, b: int, mask: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
            keep = mask.bool().reshape(-1)
            rep = h_out.reshape(-1, h_out.shape[-1])[keep.to(h_out.device)].double()
            store.put(("kernel", b, i), cka.kernel_of(rep))

        batches = walk_layers(sm, calibration, store, batch_size=batch_size, on_layer=on_layer,
                              progress=progress, desc="CKA (streamed)")
        for b in range(len(batches)):
            cka.update_kernels(torch.stack([store.get(("kernel", b, i)) for i in range(sm.num_layers)]))
    return LayerSimilarity(cka.compute(), kernel, sum(tokens_per_batch), calibration.to_dict())


@torch.inference_mode()
def streamed_perplexity(
    sm: StreamedModel,
    windows: Calibration,
    *,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    progress: bool = True,
    max_memory: int | None = None,
    scratch: Path | None = None,
    report=None,
) -> PerplexityResult:
    """Perplexity as :func:`~depthprune.evaluate.perplexity.perplexity_on` computes it: the layers one at a
    time, then the final norm and the LM head (logits a chunk of tokens at a time)."""
    first_target = max(1, len(windows.description.get("special_prefix", [])))
    if windows.input_ids.shape[1] <= first_target:
        raise InputError(f"windows of {windows.input_ids.shape[1]} tokens leave nothing to predict after the "
                         "special prefix; use --seq-len 2 or more (the papers use 128)")
    total, count = 0.0, 0
    with states_store(sm, windows, max_memory, scratch, head=True, report=report) as store:
        batches = walk_layers(sm, windows, store, batch_size=batch_size, progress=progress,
                              desc="perplexity (streamed)")
        with sm.outside(head=True):
            for b, (ids, mask) in enumerate(batches):
                hidden = sm.final_states(ids, mask, store.get(b).to(sm.device))
                t, c = nll_sum(sm.model, hidden, ids, mask, first_target, chunk_tokens)
                total, count = total + t, count + c
    if count == 0:
        raise InputError("perplexity over zero scored tokens means nothing: the text gave no window with a "
                         "target token; use a longer text or a smaller --seq-len")
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count, windows=windows.num_windows,
                            seq_len=int(windows.input_ids.shape[1]), source=str(windows.description.get("source")))
