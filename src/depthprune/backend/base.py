"""A model as the algorithms see it: decoder layers one at a time, the parts outside them, the LM head.

Scoring, the searches, compensation fits, perplexity and divergence metrics
are written once against :class:`Backend`. Two implementations:

* :class:`~depthprune.backend.memory.InMemoryBackend`: the weights are
  resident; :meth:`Backend.layer` hands out the layer itself;
* :class:`~depthprune.backend.streamed.StreamedBackend`: the weights stay on
  disk; each layer is materialised for the block that uses it and freed, so a
  model larger than memory runs with one layer (and the embeddings) loaded.

Layers are called with the arguments the model's own forward gives them
(:mod:`.calls`), so a layer-major pass, a candidate stack and a streamed model
compute exactly what the model itself computes. What needs the whole model at
once (gradients, lm-eval, generation) asks :meth:`Backend.require_memory`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..engine.merged import MergedLayer, PatchedLayer
from ..errors import InputError
from ..models.arch import ArchSpec, get_layers, per_layer_config_values, spec_for
from ..models.forward import Batch
from .calls import LayerCall, final_states, record_calls
from .states import StateStore


class NeedsMemoryError(InputError):
    """An option that needs the whole model in memory was asked of a streamed model."""


def originals(module: nn.Module, index: dict[int, int]) -> list[int]:
    """The original layers (positions in ``index``, by module id) a candidate layer is made of, in order."""
    if isinstance(module, MergedLayer):
        return [i for member in module.members for i in originals(member, index)]
    if isinstance(module, PatchedLayer):
        return originals(module.inner, index)
    return [index[id(module)]]


class Backend:
    """See the module docstring. Subclasses provide weights (``layer``, ``materialized``, ``outside``), memory
    (``state_store``, ``batch_groups``) and the checkpoint (``save``); plans are applied on top of them
    (:mod:`depthprune.surgery.apply`)."""

    kind: ClassVar[str]
    trainable: ClassVar[bool]

    def __init__(self, model: nn.Module, tokenizer: Any, source: str, path: str | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.path = path
        self.spec: ArchSpec = spec_for(model)

    # ------------------------------------------------------------ what the model is

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return get_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def per_layer_config(self) -> dict[str, list]:
        """Per-layer config lists (e.g. Gemma's ``layer_types``), one entry per current layer."""
        return per_layer_config_values(self.config, self.spec)

    def head_cost(self) -> float:
        """The LM head's work per token in units of one decoder layer's (its weights over a layer's)."""
        head = self.model.get_output_embeddings().weight.numel()
        return head / max(1, sum(p.numel() for p in self.layers[0].parameters()))

    def layer_index(self) -> dict[int, int]:
        """Position of each current layer module, by id (candidate layers are resolved through it)."""
        return {id(layer): i for i, layer in enumerate(self.layers)}

    def open_like(self, source: str) -> "Backend":
        """Another model opened the way this one was (dtype, device; streamed with the same memory budget)."""
        raise NotImplementedError

    def require_memory(self, what: str) -> None:
        """Refuse ``what`` (an option, as the user typed it) unless the whole model is in memory."""
        if not self.trainable:
            raise NeedsMemoryError(
                f"{what} needs the model in memory (pass --no-stream, or use a machine where the model fits); "
                "streaming runs scoring, every pruning method, linear/cosine compensation, surgery and "
                "ppl/kl/top1 evaluation")

    # ------------------------------------------------------------ weights

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights in place for the block."""
        with self.materialized([self.layers[index]]):
            yield self.layers[index]

    def materialized(self, modules: Sequence[nn.Module]):
        """Context: the weights of every original layer the candidate ``modules`` are made of, for the block."""
        raise NotImplementedError

    def outside(self, head: bool = False):
        """Context: the embeddings and final norm (and the LM head with ``head``) in place for the block."""
        raise NotImplementedError

    # ------------------------------------------------------------ calling layers

    def record_calls(self, batches: Sequence[Batch]) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
        """Per batch: the state entering layer 0 and every layer's call (see :mod:`.calls`)."""
        entering, calls = [], []
        with self.outside():
            for ids, mask in batches:
                h0, layer_calls = record_calls(self.model, self.layers, ids, mask)
                entering.append(h0)
                calls.append(layer_calls)
        return entering, calls

    def final_states(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The base model's output when its last layer outputs ``last``. Call inside :meth:`outside`."""
        return final_states(self.model, self.layers, ids, mask, last)

    def to_device(self, batches: Sequence[Batch]) -> list[Batch]:
        return [(ids.to(self.device), mask.to(self.device)) for ids, mask in batches]

    # ------------------------------------------------------------ memory

    def state_store(self, windows: int, seq_len: int, *, sets: int = 1, extra: int = 0,
                    head: bool = False) -> StateStore:
        """Where ``sets`` sets of hidden states of ``windows`` windows wait between layers."""
        raise NotImplementedError

    def batch_groups(self, count: int) -> list[list[int]]:
        """Which of ``count`` batches a layer-major pass runs through a layer together: all of them when
        loading a layer is the cost (streaming), one at a time when memory is (in memory)."""
        raise NotImplementedError

    # ------------------------------------------------------------ checkpoints

    def save(self, directory: Any, *, progress: bool = False) -> dict[str, Any]:
        """Write the model (weights, config, generation config, tokenizer) into an existing ``directory``;
        returns what was written."""
        raise NotImplementedError
