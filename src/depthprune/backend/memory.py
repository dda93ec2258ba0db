"""The in-memory backend: a model whose weights are resident (on the CPU, a GPU, or spread by accelerate)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..models.arch import count_parameters, model_device
from ..models import load as loading
from .base import Backend
from .states import StateStore


class InMemoryBackend(Backend):
    kind: ClassVar[str] = "in-memory"
    trainable: ClassVar[bool] = True

    def __init__(self, model: nn.Module, tokenizer: Any = None, source: str = "model", path: str | None = None):
        super().__init__(model, tokenizer, source, path)

    @classmethod
    def of(cls, model_or_backend: "nn.Module | Backend | Any") -> Backend:
        """A backend for ``model_or_backend`` (a backend, a :class:`~depthprune.models.load.LoadedModel`, or a
        bare ``nn.Module``), so the Python API takes any of them."""
        if isinstance(model_or_backend, Backend):
            return model_or_backend
        if isinstance(model_or_backend, nn.Module):
            return cls(model_or_backend)
        loaded = model_or_backend
        return cls(loaded.model, loaded.tokenizer, loaded.source, loaded.path)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def open_like(self, source: str) -> Backend:
        device = "auto" if getattr(self.model, "hf_device_map", None) else str(self.device)
        return InMemoryBackend.of(loading.load_model(source, dtype=self.dtype, device=device, progress=False))

    def materialized(self, modules: Sequence[nn.Module]):
        return nullcontext()

    def outside(self, head: bool = False):
        return nullcontext()

    def state_store(self, windows: int, seq_len: int, *, sets: int = 1, extra: int = 0,
                    head: bool = False) -> StateStore:
        return StateStore(device=None)

    def batch_groups(self, count: int) -> list[list[int]]:
        return [[b] for b in range(count)]

    def save(self, directory: Path, *, progress: bool = False) -> dict[str, Any]:
        self.model.save_pretrained(directory, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return {"parameters": count_parameters(self.model)}

