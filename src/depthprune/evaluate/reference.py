"""Which model a KL or top-1 is measured against, and loading it: a reference named by the user, recorded in
a checkpoint's run record, or the input itself when it is measured first; refused before any model loads when
its vocabulary differs."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import load as loading
from ..run_record import RunRecord
from .distributions import DivergenceError


def load_reference(source: str, like: nn.Module | None = None, *, dtype: Any = None, device: str | None = "cpu",
                   progress: bool = True) -> Any:
    """Load a reference model (in ``like``'s dtype and device when given)."""
    if like is not None:
        params = next(like.parameters())
        dtype, device = params.dtype, str(params.device)
    return loading.load_model(source, dtype=dtype, device=device, progress=progress)


def release_memory() -> None:
    """Return the memory of a model the caller just dropped (a reference, a teacher) before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model sources name the same model (the same string, or the same directory on disk)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        return Path(str(loading.resolve_source(a))).resolve() == Path(str(loading.resolve_source(b))).resolve()
    except Exception:  # an unresolvable source (a hub id offline) is simply not the same one
        return False


def reference_is_input(reference: str | None, input_source: str, input_path: str | None,
                       first_is_input: bool, message: str) -> bool:
    """Whether the reference is the model measured first (none named, or the input itself), so that model's
    first measurement gives the reference; a one-line error (``message``) when it is but is not measured
    first."""
    if reference is None or same_model(reference, input_source) or same_model(reference, input_path):
        if not first_is_input:
            raise DivergenceError(message)
        return True
    return False


def recorded_reference(model: str) -> str | None:
    """The dense model a checkpoint was pruned from, as its run record says (else None; an unreadable record
    is a one-line error)."""
    path = Path(model).expanduser()
    run = RunRecord.of_checkpoint(path) if path.is_dir() else None
    return run.source if run is not None and run.source else None


def check_reference_vocab(model: str, reference: str, option: str = "--reference") -> None:
    """Before any model loads: a reference (or teacher) on disk with another vocabulary size is a one-line error."""
    mine, theirs = loading.local_config(model), loading.local_config(reference)
    if mine is None or theirs is None:
        return
    a, b = _config_vocab(mine), _config_vocab(theirs)
    if a is not None and b is not None and a != b:
        raise DivergenceError(f"{option} {reference} has a vocabulary of {b:,} tokens and --model {model} "
                              f"{a:,}: KL needs the same tokenizer; pass the dense model this one was made from")


def _config_vocab(config: dict[str, Any]) -> int | None:
    value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(value) if isinstance(value, int) else None
