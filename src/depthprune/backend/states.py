"""Where the calibration hidden states live between layers: in memory, or spilled to disk.

Streaming passes every calibration batch through layer i before loading layer
i+1, so the states of all batches wait between layers. They are the only
thing besides one layer (and the embeddings) that streaming holds; when they
would not fit the memory budget they go to numpy memmaps in a scratch
directory, and only the batch being computed is in memory.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch

from ..errors import InputError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | None, option: str = "--max-memory") -> int | None:
    """``8GB``, ``500MB``, ``16GiB`` or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise InputError(f"{option} {text!r}: give a size such as 8GB, 500MB or 16GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise InputError(f"{option} must be positive, got {text!r}")
    return size


def format_size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def available_memory() -> int:
    """Memory this process can still use without swapping (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


class StateStore:
    """One tensor per key (a batch's hidden states, a layer's CKA kernel), in memory or in a memmap file each.

    In memory, tensors are kept on ``device`` (None: where they are, e.g. on the GPU of an in-memory model).

    Spilled tensors keep their exact bytes (bfloat16 included: they are stored as raw bytes), so a spilled run
    computes exactly what an in-memory run computes.
    """

    def __init__(self, spill_dir: Path | None = None, device: str | torch.device | None = "cpu"):
        self.spill_dir = spill_dir
        self.device = device
        self._memory: dict[object, torch.Tensor] = {}
        self._disk: dict[object, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
        self._owned = False
        self._files = 0

    @classmethod
    def spilling(cls, parent: Path | None) -> "StateStore":
        """A store writing to a new temporary directory inside ``parent`` (or the system's temp dir)."""
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        store = cls(Path(tempfile.mkdtemp(prefix="depthprune-states-", dir=parent)))
        store._owned = True
        return store

    @property
    def spills(self) -> bool:
        return self.spill_dir is not None

    def put(self, key: object, tensor: torch.Tensor) -> None:
        if self.spill_dir is None:
            self._memory[key] = tensor.detach() if self.device is None else tensor.detach().to(self.device)
            return
        tensor = tensor.detach().to("cpu").contiguous()
        if key in self._disk:
            path = self._disk[key][0]
        else:
            path, self._files = self.spill_dir / f"{self._files}.bin", self._files + 1
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        array = np.memmap(path, dtype=np.uint8, mode="w+", shape=raw.shape)
        array[:] = raw
        array.flush()
        del array
        self._disk[key] = (path, tensor.dtype, tuple(tensor.shape))

    def __contains__(self, key: object) -> bool:
        return key in self._memory or key in self._disk

    def drop(self, key: object) -> None:
        """Forget ``key`` (and delete its file, if spilled)."""
        self._memory.pop(key, None)
        entry = self._disk.pop(key, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

    def get(self, key: object) -> torch.Tensor:
        if self.spill_dir is None:
            return self._memory[key]
        path, dtype, shape = self._disk[key]
        raw = np.array(np.memmap(path, dtype=np.uint8, mode="r"))
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def close(self) -> None:
        self._memory.clear()
        self._disk.clear()
        if self._owned and self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def state_bytes(num_windows: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the hidden states of every calibration window at one depth."""
    return num_windows * seq_len * hidden * torch.empty((), dtype=dtype).element_size()
