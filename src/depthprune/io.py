"""Write files and checkpoints atomically and never over the user's input.

Every file goes to a uniquely named temporary sibling first and is renamed into
place (``os.replace``), so a reader never sees half a file. A checkpoint is
built in a temporary sibling directory and renamed at the end, so an
interrupted run leaves either the old directory or the complete new one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from torch import nn

from ._version import __version__
from .errors import InputError
from .plan import PLAN_FILE, Plan

if TYPE_CHECKING:
    from .backend import Backend

log = logging.getLogger(__name__)


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
    remove_stale_temporaries(target)
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


# ---------------------------------------------------------------- what a command may write

MARKER = ".depthprune"
"""File inside every directory depthprune creates, naming its kind; only such directories are replaced or
deleted, and only by a command writing the same kind."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")


def holds_model(directory: Path) -> bool:
    """A model directory: a ``config.json`` beside weights."""
    if not (directory / "config.json").is_file():
        return False
    return any(f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json") for f in directory.iterdir())


def model_dir_around(path: Path) -> Path | None:
    """The nearest existing directory at or above ``path`` that holds a model, if any."""
    for directory in (path, *path.parents):
        if directory.is_dir() and holds_model(directory):
            return directory
    return None


def kind_of(directory: Path) -> str | None:
    """What depthprune wrote into ``directory`` (its marker), or None when depthprune did not create it.

    Checkpoints and bench folders written before markers existed are recognised by their files.
    """
    marker = directory / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("kind"))
        except (OSError, ValueError, AttributeError):
            return None
    if (directory / PLAN_FILE).is_file() and holds_model(directory):
        return "checkpoint"
    if (directory / "rows").is_dir() and (directory / "results.json").is_file():
        return "bench"
    return None


def mark(directory: Path, kind: str) -> None:
    write_json(directory / MARKER, {"written_by": f"depthprune {__version__}", "kind": kind})


def written_by_depthprune(path: Path) -> bool:
    """A JSON file depthprune wrote (it carries ``written_by``), or a YAML file headed ``# written_by: depthprune``."""
    if path.suffix in (".yaml", ".yml"):
        try:
            with open(path, encoding="utf-8") as stream:
                return stream.readline().startswith("# written_by: depthprune")
        except (OSError, UnicodeDecodeError):
            return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("written_by", "")).startswith("depthprune")


def _resolve(path: str | Path, option: str) -> Path:
    if not str(path).strip():
        raise OutputError(f"{option} is empty (an unset shell variable?); give the path to write to")
    return Path(path).expanduser().resolve()


def _refuse_inside_model(path: Path, option: str) -> None:
    around = model_dir_around(path)
    if around is not None:
        raise OutputError(f"{option} {path} is inside the model directory {around}; depthprune never writes into "
                          "a model directory: choose a path outside it")


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor must be a directory we can create ``path`` in."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, so the path cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot write in {parent} (permission denied); choose another path")


def check_output_dir(
    out: str | Path,
    *,
    inputs: list[str | Path] = (),
    overwrite: bool = False,
    kind: str = "checkpoint",
    option: str = "--out",
) -> Path:
    """Check a directory a command will write, before any work (the rules are in the README's Safety section).

    ``kind`` names what the command writes (``checkpoint``, ``scores``, ``analysis``, ``bench``, ``work``). A
    non-empty existing directory is accepted only if depthprune wrote it as the same kind; a checkpoint also
    needs ``overwrite``. The empty path, ``/``, the home and the working directory are never an output.
    """
    resolved = _resolve(out, option)
    if resolved in (Path("/"), Path.home().resolve(), Path.cwd().resolve()):
        raise OutputError(f"{option} {out!s} is {resolved}, which would be replaced; give a new directory")
    for src in inputs:
        src_path = Path(src).expanduser()
        if not str(src).strip() or not src_path.exists():
            continue
        src_path = src_path.resolve()
        if resolved == src_path or src_path.is_relative_to(resolved) or resolved.is_relative_to(src_path):
            raise OutputError(
                f"{option} {resolved} overlaps the input model {src_path}; choose a new directory "
                "(depthprune never writes into or over its input)"
            )
    _refuse_inside_model(resolved.parent, option)
    if resolved.exists() and not resolved.is_dir():
        raise OutputError(f"{option} {resolved} exists and is a file; choose a directory path")
    if resolved.is_dir() and any(resolved.iterdir()):
        found = kind_of(resolved)
        if found != kind:
            what = "a model directory" if holds_model(resolved) else "not empty"
            raise OutputError(f"{option} {resolved} is {what} and depthprune did not write it as {kind} output; "
                              "choose a new directory (depthprune only replaces what it wrote)")
        if kind == "checkpoint" and not overwrite:
            raise OutputError(f"{option} {resolved} exists and is not empty; pass --overwrite to replace it")
    _writable_parent(resolved, option)
    return resolved


def check_output_file(path: str | Path, *, option: str = "--json", suffix: str = ".json") -> Path:
    """Check a single result file a command will write: a path ending in ``suffix`` (``.json``, ``.yaml``)
    outside any model directory that is new or a result depthprune wrote earlier."""
    resolved = _resolve(path, option)
    _refuse_inside_model(resolved.parent, option)
    if resolved.is_dir():
        raise OutputError(f"{option} {resolved} is a directory; give a file path such as {resolved / 'result.json'}")
    if resolved.suffix != suffix:
        raise OutputError(f"{option} {resolved} must end in {suffix}")
    if resolved.exists() and not written_by_depthprune(resolved):
        raise OutputError(f"{option} {resolved} exists and is not a result depthprune wrote; not replacing it "
                          "(remove it yourself or choose another path)")
    _writable_parent(resolved, option)
    return resolved


def write_result(path: str | Path, data: dict[str, Any]) -> Path:
    """A result file for the user (``--json``): marked as depthprune's, its folder created if missing."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_json(target, {"written_by": f"depthprune {__version__}", **data})


def prepare_dir(out: Path, kind: str) -> Path:
    """Create (or keep) an output directory written in place (scores, analysis, bench) and mark it."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        mark(out, kind)
    return out


# ---------------------------------------------------------------- leftovers of killed runs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries a killed run left beside ``target`` (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``,
    ``.NAME.PID.*.tmp``) whose process is gone; returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(?:tmp|old)-(\d+)-.*|(\d+)\.[0-9a-f]+\.tmp)$")
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        log.warning("removed %s, left by an interrupted run", entry)
    return removed


@contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False, kind: str = "checkpoint") -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` when the block succeeds (and is marked as ``kind``).

    Temporaries carry the process id, so the next run writing ``out`` removes what a killed run left.
    """
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        mark(tmp, kind)
        _apply_umask(tmp)
        if out.exists():
            if any(out.iterdir()) and not (overwrite and kind_of(out) == kind):
                raise OutputError(f"{out} appeared while writing; not replacing it")
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
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
    model: "nn.Module | Backend",
    tokenizer: Any = None,
    plan: Plan | None = None,
    *,
    extra_json: dict[str, Any] | None = None,
    writers: list[Callable[[Path], Any]] = (),
) -> dict[str, Any]:
    """Write the model (safetensors; a model or a :class:`~depthprune.backend.Backend`), its tokenizer, plan and
    extra files into an existing ``directory``; returns what the backend reports it wrote."""
    from .backend import Backend, InMemoryBackend

    backend = model if isinstance(model, Backend) else InMemoryBackend(model, tokenizer)
    saved = backend.save(directory)
    write_beside(directory, plan, extra_json=extra_json, writers=writers)
    return saved


def write_beside(directory: Path, plan: Plan | None = None, *, extra_json: dict[str, Any] | None = None,
                 writers: list[Callable[[Path], Any]] = ()) -> None:
    """The files written beside a checkpoint's weights: the plan, extra JSON files, then ``writers``."""
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
