"""A safetensors checkpoint on disk, read one tensor at a time.

Streaming never asks transformers to load weights: it reads the headers (names,
dtypes, shapes, which shard holds what) and then exactly the tensors a step
needs. Each read opens the shard with ``safe_open`` and closes it again, so the
file's memory map, whose touched pages count as the process's resident memory,
never outlives the tensors that were asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import DepthpruneError, MissingInputError
from ..models.consistency import refuse_non_finite_weights
from ..models.load import ModelLoadError, check_checkpoint

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

#: safetensors dtype names and the torch dtypes they hold.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class StreamingError(DepthpruneError, ValueError):
    """Streaming cannot do what was asked (a checkpoint layout or an option it does not support)."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header: a tensor's name, dtype and shape, and the shard file holding it (a
    stored tensor, read from the header) or none (a tensor about to be written, see
    :mod:`depthprune.surgery.safetensors_out`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensor as stored, or once cast to ``dtype`` (floating tensors only are cast)."""
        as_dtype = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        return self.numel * torch.empty((), dtype=as_dtype).element_size()


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON); reads nothing else."""
    try:
        with open(path, "rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            return json.loads(stream.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({err})") from err


class Checkpoint:
    """The tensors of a local safetensors checkpoint (one file or shards with an index), by stored name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config = check_checkpoint(self.directory)
        shards = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            header = read_header(self.directory / shard)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise StreamingError(f"{shard}: tensor {name} has dtype {entry['dtype']}, which streaming "
                                         "does not read")
                self.tensors[name] = TensorInfo(name, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), shard)

    def _shard_files(self) -> list[str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        if (self.directory / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        found = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if found:
            return found
        raise MissingInputError(f"{self.directory} has no safetensors weights; streaming reads only safetensors "
                                "(re-save the model with save_pretrained(safe_serialization=True))")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def nbytes(self, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the named tensors (all by default), as stored or cast to ``dtype``."""
        chosen = self.tensors if names is None else {n: self.tensors[n] for n in names}
        return sum(info.nbytes(dtype) for info in chosen.values())

    def read(self, names: Iterable[str], *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load the named tensors (floating ones cast to ``dtype``) onto ``device``; each shard is opened and
        closed once per call."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.tensors[name].shard, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            with safe_open(str(self.directory / shard), framework="pt", device="cpu") as handle:
                for name in shard_names:
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    out[name] = tensor.to(device)
        refuse_non_finite_weights(out.items(), self.directory)
        return out


def weights_bytes(directory: str | Path, dtype: torch.dtype | None = None) -> int:
    """Size of a checkpoint's weights from its safetensors headers, as stored or cast to ``dtype``."""
    return Checkpoint(directory).nbytes(dtype=dtype)
