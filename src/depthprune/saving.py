"""Save a model as a plain transformers checkpoint, atomically: verified before it is committed.

This sits above the backends (a checkpoint is whatever a :class:`~depthprune.backend.Backend` writes) and above
:mod:`depthprune.io` (atomic directories, which know nothing of models), so neither has to import the other.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from .backend import Backend, InMemoryBackend
from .io import atomic_directory, check_output_dir, write_beside
from .models.validate import verify_checkpoint
from .plan import Plan


@contextmanager
def atomic_checkpoint(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`~depthprune.io.atomic_directory` for a checkpoint: it is committed only if
    :func:`~depthprune.models.validate.verify_checkpoint` accepts it (finite weights, the config's depth)."""
    with atomic_directory(out, overwrite=overwrite, kind="checkpoint", verify=verify_checkpoint) as tmp:
        yield tmp


def write_checkpoint(
    directory: Path,
    model: "nn.Module | Backend",
    tokenizer: Any = None,
    plan: Plan | None = None,
    *,
    extra_json: dict[str, Any] | None = None,
    writers: list[Callable[[Path], Any]] = (),
) -> dict[str, Any]:
    """Write the model (safetensors; a model or a :class:`~depthprune.backend.Backend`), its tokenizer, plan and
    extra files into an existing ``directory``; returns what the backend reports it wrote."""
    backend = model if isinstance(model, Backend) else InMemoryBackend(model, tokenizer)
    saved = backend.save(directory)
    write_beside(directory, plan, extra_json=extra_json, writers=writers)
    return saved


def save(
    model: nn.Module,
    tokenizer: Any,
    out: str | Path,
    plan: Plan | None = None,
    *,
    inputs: list[str | Path] = (),
    overwrite: bool = False,
    extra_json: dict[str, Any] | None = None,
    writers: list[Callable[[Path], Any]] = (),
) -> Path:
    """Save a pruned model as a plain transformers checkpoint (safetensors), atomically.

    ``inputs`` lists paths that must not be written over (the source model).
    ``extra_json`` maps file names to JSON-serialisable objects written beside it;
    each of ``writers`` is called with the temporary directory to add more files.
    """
    out = check_output_dir(out, inputs=inputs, overwrite=overwrite)
    with atomic_checkpoint(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, model, tokenizer, plan, extra_json=extra_json, writers=writers)
    return out
