"""Calling decoder layers one at a time with exactly the arguments the model's own forward gives them.

Every algorithm that runs a stack of layers other than the model's own (a
search's candidate, a layer-major pass, a streamed model) needs what the model
passes each layer besides its hidden state: the attention mask (per layer type
for sliding-window layers), rotary cos/sin, position ids. :func:`record_calls`
runs the model's own forward with every layer's ``forward`` replaced by a
recorder that passes its input through, so those arguments come from the
model's code, not from a copy of it; :func:`final_states` runs the same
forward to get what the base model returns after its last layer (the final
norm, and whatever else the family does there).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..models.arch import get_base_model
from ..models.forward import hidden_of


class _Stop(Exception):
    """Raised by a recording layer to end the model's forward once the wanted calls are recorded."""


@dataclass
class LayerCall:
    """The arguments one decoder layer received besides its hidden state (kept without it, so a recorded call
    holds no activations), and whether the hidden state came positionally."""

    args: tuple
    kwargs: dict[str, Any]
    positional: bool

    @classmethod
    def record(cls, args: tuple, kwargs: dict[str, Any]) -> "LayerCall":
        if args:
            return cls(args[1:], dict(kwargs), True)
        return cls((), {k: v for k, v in kwargs.items() if k != "hidden_states"}, False)

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.positional:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@contextmanager
def replaced_forwards(layers: nn.ModuleList, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Give every layer an instance-level ``forward`` for the block, then put back what was there (accelerate's
    device hooks are instance-level forwards too)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer, previous in zip(layers, saved):
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def record_calls(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor,
                 upto: int | None = None, *, training: bool = False) -> tuple[torch.Tensor, list[LayerCall]]:
    """The hidden state entering layer 0 and the calls of layers ``0..upto`` (default: all) for one batch.

    Needs the embeddings in place. The recorder of layer ``upto`` stops the forward. Recorded in inference
    mode, unless ``training`` (then under ``no_grad``: inference tensors cannot be saved for a backward pass).
    """
    with torch.no_grad() if training else torch.inference_mode():
        return _record_calls(model, layers, ids, mask, upto)


def _record_calls(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor,
                  upto: int | None) -> tuple[torch.Tensor, list[LayerCall]]:
    upto = len(layers) - 1 if upto is None else upto
    calls: list[LayerCall] = []
    entering: list[torch.Tensor] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = hidden_of(args, kwargs)
            if index == 0:
                entering.append(hidden)
            calls.append(LayerCall.record(args, kwargs))
            if index == upto:
                raise _Stop
            return hidden
        return forward

    with replaced_forwards(layers, recorder):
        try:
            get_base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    if len(calls) != upto + 1:
        raise RuntimeError(f"the model's forward called {len(calls)} layers, expected {upto + 1}")
    return entering[0], calls


def final_states(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor,
                 last: torch.Tensor) -> torch.Tensor:
    """What the base model returns when its last layer outputs ``last`` (the final norm, by the model's own
    code; differentiable in ``last`` outside inference mode). Needs the embeddings and final norm in place."""
    count = len(layers)

    def recorder(index: int):
        def forward(*args, **kwargs):
            return last if index == count - 1 else hidden_of(args, kwargs)
        return forward

    with replaced_forwards(layers, recorder):
        return get_base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
