"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at
once; a 5 GB shard of a pruned 70B model would then cost 5 GB. The format is
simple (an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes), so the header is
written from the names, dtypes and shapes alone and each tensor's bytes
follow as it is produced.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..backend.checkpoint import DTYPE_NAMES, TensorInfo


def header_bytes(entries: Sequence[TensorInfo], metadata: dict[str, str]) -> bytes:
    """The length prefix and the JSON header, padded with spaces to a multiple of 8 bytes as safetensors does."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes()]}
        offset += e.nbytes()
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, entries: Sequence[TensorInfo],
                      produce: Callable[[TensorInfo], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` to ``path``, calling ``produce(entry)`` for each tensor's value in order.

    A produced tensor must have the declared dtype and shape (the header is already written).
    """
    with open(path, "wb") as stream:
        stream.write(header_bytes(entries, metadata or {}))
        for entry in entries:
            tensor = produce(entry).detach().to("cpu").contiguous()
            if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise RuntimeError(f"{entry.name}: produced {tensor.dtype} {tuple(tensor.shape)}, declared "
                                   f"{entry.dtype} {entry.shape}")
            stream.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def plan_shards(entries: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Consecutive groups of at most ``max_shard_size`` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes() > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes()
    return shards
