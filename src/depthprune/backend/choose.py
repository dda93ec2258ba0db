"""Whether to stream: asked for (``--stream`` / ``--no-stream``) or chosen when the weights would not fit.

The weights' size comes from the safetensors headers (no tensor is read), in
the dtype the model would be loaded in, and is compared with ``--max-memory``
or the memory available now (psutil; on a GPU its free memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.load import ALIASES, resolve_device, resolve_dtype
from ..paths import cache_dir
from .checkpoint import Checkpoint
from .states import available_memory, format_size

#: Loading in memory needs the weights plus room to run; stream when they take more than this share.
FIT_FRACTION = 0.9


@dataclass(frozen=True)
class StreamChoice:
    stream: bool
    reason: str


def local_model_dir(source: str) -> Path | None:
    """The directory ``source`` loads from when it is already on disk (a converted alias, a local directory)."""
    if source in ALIASES:
        target = cache_dir() / "models" / source
        return target if (target / "config.json").is_file() else None
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def memory_budget(device: str | None, max_memory: int | None) -> tuple[int, str]:
    """(bytes, what they are) the in-memory path could use."""
    if max_memory:
        return max_memory, "--max-memory"
    if device not in (None, "cpu") and torch.cuda.is_available():
        if device == "auto":
            free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
            return free + available_memory(), "free GPU memory plus available RAM"
        return torch.cuda.mem_get_info(torch.device(device))[0], f"free memory on {device}"
    return available_memory(), "available memory"


def choose_streaming(source: str, stream: bool | None, *, dtype: str | None = None, device: str | None = "cpu",
                     max_memory: int | None = None) -> StreamChoice:
    """Stream when asked; with no preference, when the model's weights would not fit in memory."""
    if stream is not None:
        return StreamChoice(stream, "--stream was given" if stream else "--no-stream was given")
    directory = local_model_dir(source)
    if directory is None or not any(directory.glob("*.safetensors")):
        return StreamChoice(False, "the model is not a local safetensors checkpoint; loading it in memory")
    torch_dtype = resolve_dtype(dtype, resolve_device("auto" if device == "auto" else device))
    weights = Checkpoint(directory).nbytes(dtype=torch_dtype)
    budget, what = memory_budget(device, max_memory)
    name = str(torch_dtype).split(".")[1]
    if weights > FIT_FRACTION * budget:
        return StreamChoice(True, f"streaming chosen: the weights take {format_size(weights)} as {name}, more "
                                  f"than {what} ({format_size(budget)}) holds, so one layer at a time is loaded "
                                  "(--no-stream loads the whole model anyway)")
    return StreamChoice(False, f"in memory: the weights take {format_size(weights)} as {name}, within {what} "
                               f"({format_size(budget)})")
