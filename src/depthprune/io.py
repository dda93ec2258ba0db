"""Write files and checkpoints atomically and never over the user's input.

Every file goes to a uniquely named temporary sibling first and is renamed into
place (``os.replace``), so a reader never sees half a file. A checkpoint is
built in a temporary sibling directory and renamed at the end, so an
interrupted run leaves either the old directory or the complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from .errors import InputError
from .plan import PLAN_FILE, Plan


class OutputError(InputError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary stream) to ``path`` atomically.

    The temporary file is opened with mode ``xb`` (not ``mkstemp``) so the result
    gets the usual umask-derived permissions instead of 0600.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as stream:
            if callable(data):
                data(stream)
            else:
                stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def check_output_dir(out: str | Path, *, inputs: list[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse outputs that would overwrite an input model or an existing result."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src_path = Path(src).expanduser()
        if not src_path.exists():
            continue
        src_path = src_path.resolve()
        if out == src_path or src_path.is_relative_to(out) or out.is_relative_to(src_path):
            raise OutputError(
                f"--out {out} overlaps the input model {src_path}; choose a new directory "
                "(depthprune never writes into or over its input)"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    return out


@contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` when the block succeeds."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise OutputError(f"{out} appeared while writing; not replacing it without --overwrite")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; give them the user's usual modes."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_checkpoint(
    directory: Path,
    model: nn.Module,
    tokenizer: Any,
    plan: Plan | None = None,
    *,
    extra_json: dict[str, Any] | None = None,
    writers: list[Callable[[Path], Any]] = (),
) -> None:
    """Write model (safetensors), tokenizer, plan and extra files into an existing ``directory``."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if plan is not None:
        write_json(directory / PLAN_FILE, plan.to_dict())
    for name, data in (extra_json or {}).items():
        write_json(directory / name, data)
    for writer in writers:
        writer(directory)


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
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, model, tokenizer, plan, extra_json=extra_json, writers=writers)
    return out
