"""A model whose weights stay on disk: an empty-weight skeleton plus the checkpoint it came from.

The skeleton is the model's own class built from its config under accelerate's
``init_empty_weights`` (every parameter on the ``meta`` device, buffers such
as rotary frequencies real), so the model's own code still builds attention
masks and position embeddings. Weights are materialised per part and freed
again: one decoder layer at a time, and the parts outside the layers (the
embeddings, the final norm, the LM head) only when a step needs them.

To call one decoder layer on its own, :meth:`StreamedModel.layer_calls` runs
the model's own forward with every layer's ``forward`` replaced by a recorder,
so the arguments a layer receives (its attention mask, per layer type for
sliding-window layers; rotary cos/sin; position ids) are exactly those the
model would pass it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..models.arch import ArchSpec, get_base_model, get_layers, get_path, spec_for
from ..models.forward import hidden_of
from ..models.load import ModelLoadError, quiet_transformers, resolve_device, resolve_dtype, resolve_source
from .checkpoint import Checkpoint, StreamingError


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


@dataclass
class StreamedModel:
    """A skeleton model, its tokenizer and the checkpoint holding its weights.

    ``dtype`` is the compute dtype every materialised tensor is cast to (as
    ``load_model`` would load it); ``device`` where layers run.
    """

    model: nn.Module
    tokenizer: Any
    checkpoint: Checkpoint
    source: str
    dtype: torch.dtype
    device: str
    spec: ArchSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = spec_for(self.model)
        self._keys = _KeyMap(self.model, self.checkpoint)

    @property
    def path(self) -> str:
        return str(self.checkpoint.directory)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return get_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------ which tensors make up which part

    def layer_prefix(self, index: int) -> str:
        return f"{self.spec.layers}.{index}."

    def layer_param_names(self, index: int) -> list[str]:
        prefix = self.layer_prefix(index)
        return [prefix + name for name, _ in self.layers[index].named_parameters()]

    def outside_param_names(self, head: bool) -> list[str]:
        """Parameters outside the decoder layers; the LM head's only with ``head`` (tied ones come anyway)."""
        head_prefix = self._head_prefix()
        names = []
        for name, _ in self.model.named_parameters():
            if name.startswith(self.spec.layers + "."):
                continue
            if not head and head_prefix and name.startswith(head_prefix):
                continue
            names.append(name)
        return names

    def _head_prefix(self) -> str | None:
        head = self.model.get_output_embeddings()
        for name, module in self.model.named_modules():
            if module is head:
                return name + "."
        return None

    def nbytes(self, names: list[str]) -> int:
        """Bytes the named parameters take once materialised in the compute dtype."""
        return sum(self.checkpoint.tensors[self._keys.stored(n)].nbytes(self.dtype) for n in names)

    @property
    def layer_bytes(self) -> int:
        """The largest decoder layer's weights in the compute dtype."""
        return max(self.nbytes(self.layer_param_names(i)) for i in range(self.num_layers))

    def outside_bytes(self, head: bool = False) -> int:
        return self.nbytes(self.outside_param_names(head))

    # ------------------------------------------------------------ materialise and free

    def stored_name(self, name: str) -> str:
        """The checkpoint's name for the model parameter ``name`` (prefix differences and tied weights resolved)."""
        return self._keys.stored(name)

    @contextmanager
    def materialized(self, names: list[str]) -> Iterator[None]:
        """Load the named parameters (and every parameter tied to them) for the block, then free them."""
        loaded = self.checkpoint.read([self._keys.stored(n) for n in names], dtype=self.dtype,
                                      device=self.device)
        replaced = []
        try:
            for name in names:
                value = loaded[self._keys.stored(name)]
                for alias in self._keys.aliases(name):
                    replaced.append((alias, _swap_parameter(self.model, alias, value)))
            yield
        finally:
            for alias, old in reversed(replaced):
                _swap_parameter(self.model, alias, old)

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights on ``device`` for the block; freed afterwards."""
        with self.materialized(self.layer_param_names(index)):
            yield self.layers[index]

    @contextmanager
    def outside(self, head: bool = False) -> Iterator[None]:
        """Embeddings and final norm (and the LM head with ``head``) materialised for the block."""
        with self.materialized(self.outside_param_names(head)):
            yield

    # ------------------------------------------------------------ calling layers on their own

    @torch.inference_mode()
    def layer_calls(self, ids: torch.Tensor, mask: torch.Tensor, upto: int) -> tuple[torch.Tensor, list[LayerCall]]:
        """The hidden state entering layer 0 and the calls of layers ``0..upto`` for this batch.

        Needs :meth:`outside` (the embeddings). The model's own forward runs with every layer replaced by a
        recorder that passes its input through; the recorder of layer ``upto`` stops the forward.
        """
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

        with _replaced_forwards(self.layers, recorder):
            try:
                get_base_model(self.model)(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                           use_cache=False)
            except _Stop:
                pass
        if len(calls) != upto + 1:
            raise RuntimeError(f"the model's forward called {len(calls)} layers, expected {upto + 1}")
        return entering[0], calls

    @torch.inference_mode()
    def final_states(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """What the base model returns when its last layer outputs ``last``: the final norm (and whatever
        else the model does after its layers), by the model's own code. Needs :meth:`outside`."""
        def recorder(index: int):
            def forward(*args, **kwargs):
                return last if index == 0 else hidden_of(args, kwargs)
            return forward

        with _replaced_forwards(self.layers, recorder):
            return get_base_model(self.model)(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                              use_cache=False).last_hidden_state


@contextmanager
def _replaced_forwards(layers: nn.ModuleList, make) -> Iterator[None]:
    """Give every layer an instance-level ``forward`` for the block (its own attributes stay visible)."""
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _swap_parameter(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> nn.Parameter:
    """Put ``value`` in place of parameter ``name``; returns the parameter it replaced."""
    owner_path, _, leaf = name.rpartition(".")
    owner = get_path(model, owner_path) if owner_path else model
    old = owner._parameters[leaf]
    owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    return old


def saved_names(model: nn.Module) -> dict[str, str]:
    """Each state-dict entry ``save_pretrained`` writes, by model name -> the name it is written under.

    Tied copies (the LM head sharing the embeddings) are left out and transformers' own renamings reverted
    (GPT-NeoX's ``lm_head`` is stored as ``embed_out``), by transformers' own functions, so a streamed save
    names tensors exactly as an in-memory save would.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    by_id = {id(tensor): name for name, tensor in state.items()}
    return {by_id[id(tensor)]: saved for saved, tensor in revert_weight_conversion(model, state).items()}


class _KeyMap:
    """Model parameter names -> names stored in the checkpoint.

    A checkpoint stores a parameter under the name ``save_pretrained`` gives it (see :func:`saved_names`),
    or, when written by other tools, under its model name with or without the base model's prefix
    (``transformer.h.0...`` vs ``h.0...`` for GPT-2). Tied parameters are read under whichever of their
    names the checkpoint has.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint):
        _refuse_converted_layouts(model)
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self._aliases = {name: names for names in groups.values() for name in names}
        saved = saved_names(model)
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._stored: dict[str, str] = {}
        missing = []
        for name in self._aliases:
            candidates = [c for alias in self._aliases[name]
                          for c in (saved.get(alias, alias), *_prefix_variants(alias, prefix))]
            found = next((c for c in candidates if c in checkpoint), None)
            if found is None:
                missing.append(name)
            else:
                self._stored[name] = found
        if missing:
            raise StreamingError(
                f"{checkpoint.directory}: the checkpoint has no tensor for {len(missing)} of the model's "
                f"parameters (e.g. {missing[0]}); streaming reads transformers' own layout: use the "
                "in-memory path (--no-stream) or re-save the model with save_pretrained")

    def stored(self, name: str) -> str:
        return self._stored[name]

    def aliases(self, name: str) -> list[str]:
        return self._aliases[name]


def _prefix_variants(name: str, prefix: str) -> list[str]:
    if not prefix:
        return [name]
    if name.startswith(prefix + "."):
        return [name, name[len(prefix) + 1:]]
    return [name, f"{prefix}.{name}"]


def _refuse_converted_layouts(model: nn.Module) -> None:
    """Streaming reads tensors one by one; a load-time conversion that fuses or splits tensors (MoE experts)
    cannot be replayed that way."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    fused = [t for t in get_model_conversion_mapping(model) if not isinstance(t, WeightRenaming)]
    if fused:
        raise StreamingError(f"{type(model).__name__} checkpoints are converted while loading (tensors fused or "
                             "split), which streaming does not replay; use the in-memory path (--no-stream)")


def local_checkpoint_dir(source: str) -> Path:
    """The local directory of ``source`` (an alias is converted once; a hub id is downloaded, weights as
    safetensors, to the Hugging Face cache as ``from_pretrained`` would)."""
    where = resolve_source(source)
    if isinstance(where, Path):
        return where
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.tiktoken"]))
    except Exception as err:  # the hub raises many types for offline / missing repositories
        raise ModelLoadError(f"could not download {source!r} for streaming ({type(err).__name__}: {err})") from err


def load_streamed(source: str, *, dtype: str | torch.dtype | None = None, device: str | None = "cpu",
                  progress: bool = True) -> StreamedModel:
    """The skeleton of ``source`` with its tokenizer; no weight is read until a step materialises it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device("auto" if device == "auto" else device)
    torch_dtype = resolve_dtype(dtype, device)
    directory = local_checkpoint_dir(source)
    checkpoint = Checkpoint(directory)
    with quiet_transformers(not progress):
        config = AutoConfig.from_pretrained(directory)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model.tie_weights()  # under init_empty_weights the tie is not made; from_pretrained makes it
        tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
    return StreamedModel(model, tokenizer, checkpoint, source, torch_dtype, device)

