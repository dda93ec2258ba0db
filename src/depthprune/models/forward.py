"""Run the decoder stack (never the LM head) over calibration batches, with hooks on its layers.

Every analysis that looks inside the model (layer statistics, CKA, Wanda
activation norms, perplexity, the search engine) is "run the decoder over
these windows and watch the layers": :func:`decoder_passes` is the loop and
:func:`layer_hooks` the watching, so no module hand-writes either.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from .arch import get_base_model, model_device

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Pass:
    """One batch through the decoder: its ids and mask (on the model's device) and the final states
    (the base model's output, i.e. after the final norm)."""

    index: int
    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor


def run_decoder(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One forward of the decoder stack without the LM head; returns the final hidden states."""
    return get_base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def batches_of(data: Calibration | Sequence[Batch], batch_size: int | None) -> list[Batch]:
    if isinstance(data, Calibration):
        return list(data.batches(batch_size or data.num_windows))
    return list(data)


def decoder_passes(
    model: nn.Module,
    data: Calibration | Sequence[Batch],
    *,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str | None = None,
    before: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Iterator[Pass]:
    """Yield one :class:`Pass` per batch of ``data`` (windows, or already-built batches).

    ``before(ids, mask)`` runs ahead of each forward, so hooks can see which batch they are in.
    """
    device = model_device(model)
    batches = batches_of(data, batch_size)
    for index, (ids, mask) in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
        ids, mask = ids.to(device), mask.to(device)
        if before is not None:
            before(ids, mask)
        yield Pass(index, ids, mask, run_decoder(model, ids, mask))


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer receives (positional or keyword, depending on the family)."""
    return args[0] if args else kwargs["hidden_states"]


def output_of(output) -> torch.Tensor:
    """A decoder layer's output hidden state (some families return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


PreHook = Callable[[int, torch.Tensor], None]
PostHook = Callable[[int, torch.Tensor], None]


@contextmanager
def layer_hooks(
    layers: Iterable[nn.Module],
    *,
    pre: PreHook | None = None,
    post: PostHook | None = None,
    indices: Iterable[int] | None = None,
) -> Iterator[None]:
    """Call ``pre(i, h_in)`` before and ``post(i, h_out)`` after layer i runs, for the duration of the block.

    ``indices`` gives the number reported for each layer (default: its position).
    """
    layers = list(layers)
    numbers = list(indices) if indices is not None else list(range(len(layers)))
    handles = []

    def pre_hook(i: int):
        def hook(module, args, kwargs):
            pre(i, hidden_of(args, kwargs))  # type: ignore[misc]
        return hook

    def post_hook(i: int):
        def hook(module, args, kwargs, output):
            post(i, output_of(output))  # type: ignore[misc]
        return hook

    try:
        for i, layer in zip(numbers, layers):
            if pre is not None:
                handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            if post is not None:
                handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
