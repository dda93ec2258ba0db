"""The streamed backend: weights stay on disk; an empty-weight skeleton plus the checkpoint they come from.

The skeleton is the model's own class built from its config under accelerate's
``init_empty_weights`` (every parameter on the ``meta`` device, buffers such
as rotary frequencies real), so the model's own code still builds attention
masks and position embeddings. Weights are materialised per part and freed
again: one decoder layer at a time, and the parts outside the layers (the
embeddings, the final norm, the LM head) only when a step needs them.

Hidden states between layers wait in a :class:`~depthprune.backend.states.StateStore`, in memory when the
memory plan says they fit ``max_memory`` beside one layer and the embeddings, else spilled to disk.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from ..models.arch import count_parameters, get_path
from ..models.consistency import untie_stored_head
from ..models.load import ModelLoadError, quiet_transformers, resolve_device, resolve_dtype, resolve_source
from .base import Backend, originals
from .checkpoint import Checkpoint, StreamingError
from .hf import fused_on_load, saved_names
from .states import StateStore, available_memory, format_size, state_bytes

Report = Callable[[str], None]


@dataclass
class MemoryPlan:
    """What a streamed pass holds at its peak, against the budget it was given."""

    layer: int
    outside: int
    states: int
    extra: int
    budget: int
    budget_from: str

    @property
    def needed(self) -> int:
        return self.layer + self.outside + self.states + self.extra

    @property
    def spill(self) -> bool:
        return self.needed > self.budget

    def describe(self) -> str:
        parts = (f"one layer {format_size(self.layer)} + embeddings {format_size(self.outside)} + calibration "
                 f"states {format_size(self.states)}" + (f" + {format_size(self.extra)} more" if self.extra else ""))
        if self.spill:
            return (f"streaming: {parts} exceed {self.budget_from} ({format_size(self.budget)}): the states "
                    "are spilled to disk")
        return f"streaming: {parts} fit {self.budget_from} ({format_size(self.budget)}); states kept in memory"


class StreamedBackend(Backend):
    """A skeleton model, its tokenizer and the checkpoint holding its weights.

    ``dtype`` is the compute dtype every materialised tensor is cast to (as ``load_model`` would load it);
    ``device`` where layers run. ``max_memory`` (bytes) is the budget for hidden states beside one layer and
    the embeddings; ``scratch`` where states spill; ``report(message)`` is told how memory was planned.
    ``save_dtype`` casts floating tensors when the pruned model is written (None: each keeps its stored dtype).
    """

    kind: ClassVar[str] = "streamed"
    trainable: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer: Any, checkpoint: Checkpoint, source: str, dtype: torch.dtype,
                 device: str, *, max_memory: int | None = None, scratch: Path | None = None,
                 report: Report | None = None, save_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, tokenizer, source, str(checkpoint.directory))
        self.checkpoint = checkpoint
        self._dtype = dtype
        self._device = device
        self.max_memory = max_memory
        self.scratch = scratch
        self.report = report
        self.save_dtype = save_dtype
        self._owned = False
        self._keys = _KeyMap(model, checkpoint)

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def open_like(self, source: str) -> "StreamedBackend":
        return load_streamed(source, dtype=self._dtype, device=self._device, progress=False,
                             max_memory=self.max_memory, scratch=self.scratch, report=self.report,
                             save_dtype=self.save_dtype)

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
        return sum(self.checkpoint.tensors[self._keys.stored(n)].nbytes(self._dtype) for n in names)

    @property
    def layer_bytes(self) -> int:
        """The largest decoder layer's weights in the compute dtype."""
        return max(self.nbytes(self.layer_param_names(i)) for i in range(self.num_layers))

    def outside_bytes(self, head: bool = False) -> int:
        return self.nbytes(self.outside_param_names(head))

    def stored_name(self, name: str) -> str:
        """The checkpoint's name for the model parameter ``name`` (prefix differences and tied weights resolved)."""
        return self._keys.stored(name)

    # ------------------------------------------------------------ materialise and free

    @contextmanager
    def materialized_names(self, names: list[str]) -> Iterator[None]:
        """Load the named parameters (and every parameter tied to them) for the block, then free them."""
        loaded = self.checkpoint.read([self._keys.stored(n) for n in names], dtype=self._dtype,
                                      device=self._device)
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

    def materialized(self, modules: Sequence[nn.Module]):
        index = self.layer_index()
        wanted = sorted({i for module in modules for i in originals(module, index)})
        return self.materialized_names([name for i in wanted for name in self.layer_param_names(i)])

    def outside(self, head: bool = False):
        return self.materialized_names(self.outside_param_names(head))

    # ------------------------------------------------------------ memory

    def memory_plan(self, windows: int, seq_len: int, *, extra: int = 0, head: bool = False) -> MemoryPlan:
        """The peak of a streamed pass holding ``windows`` windows of states (``extra``: what else it keeps, e.g.
        CKA kernels), against ``max_memory`` or the memory available now."""
        hidden = int(getattr(self.config, "hidden_size", 0) or getattr(self.config, "n_embd"))
        states = state_bytes(windows, seq_len, hidden, self._dtype)
        budget, source = ((self.max_memory, "--max-memory") if self.max_memory
                          else (available_memory(), "available memory"))
        return MemoryPlan(self.layer_bytes, self.outside_bytes(head), states, extra, budget, source)

    def state_store(self, windows: int, seq_len: int, *, sets: int = 1, extra: int = 0,
                    head: bool = False) -> StateStore:
        plan = self.memory_plan(windows * sets, seq_len, extra=extra, head=head)
        if self.report is not None:
            self.report(plan.describe())
        return StateStore.spilling(self.scratch) if plan.spill else StateStore()

    def batch_groups(self, count: int) -> list[list[int]]:
        return [list(range(count))]

    # ------------------------------------------------------------ checkpoints

    def adopt(self, directory: Path, *, progress: bool = False) -> "StreamedBackend":
        """A checkpoint written for this model (its pruned copy in the job's scratch space), streamed with the
        same settings under this model's source name; its files are the job's, so saving moves them."""
        adopted = load_streamed(str(directory), dtype=self._dtype, device=self._device, progress=progress,
                                max_memory=self.max_memory, scratch=self.scratch, report=self.report,
                                save_dtype=self.save_dtype)
        adopted.source = self.source
        adopted._owned = True
        return adopted

    def save(self, directory: Path, *, progress: bool = False) -> dict[str, Any]:
        """Move (a checkpoint this backend wrote) or copy (anything else: never move a user's files) the
        checkpoint's files into ``directory``."""
        directory = Path(directory)
        files = []
        for path in sorted(Path(self.path).iterdir()):
            if path.is_file():
                (os.replace if self._owned else shutil.copy2)(path, directory / path.name)
                files.append(path.name)
        return {"files": files, "parameters": count_parameters(self.model)}


def _swap_parameter(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> nn.Parameter:
    """Put ``value`` in place of parameter ``name``; returns the parameter it replaced."""
    owner_path, _, leaf = name.rpartition(".")
    owner = get_path(model, owner_path) if owner_path else model
    old = owner._parameters[leaf]
    owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    return old


class _KeyMap:
    """Model parameter names -> names stored in the checkpoint.

    A checkpoint stores a parameter under the name ``save_pretrained`` gives it (see :func:`saved_names`),
    or, when written by other tools, under its model name with or without the base model's prefix
    (``transformer.h.0...`` vs ``h.0...`` for GPT-2). Tied parameters are read under whichever of their
    names the checkpoint has.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint):
        if fused_on_load(model):
            raise StreamingError(f"{type(model).__name__} checkpoints are converted while loading (tensors fused "
                                 "or split), which streaming does not replay; use the in-memory path (--no-stream)")
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
                  progress: bool = True, max_memory: int | None = None, scratch: Path | None = None,
                  report: Report | None = None, save_dtype: torch.dtype | None = None) -> StreamedBackend:
    """The skeleton of ``source`` with its tokenizer; no weight is read until a step materialises it (the
    keywords after ``progress`` are :class:`StreamedBackend`'s)."""
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
        untie_stored_head(model, lambda names: checkpoint.read([n for n in names if n in checkpoint]))
        tokenizer = AutoTokenizer.from_pretrained(directory)
    model.eval()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
    return StreamedBackend(model, tokenizer, checkpoint, source, torch_dtype, device, max_memory=max_memory,
                           scratch=scratch, report=report, save_dtype=save_dtype)

