"""Write files and directories atomically and never over the user's input.

Every file goes to a uniquely named temporary sibling first and is renamed into
place (``os.replace``), so a reader never sees half a file. A directory (a
checkpoint: :mod:`depthprune.saving`) is built in a temporary sibling, checked
by the ``verify`` its writer gives and renamed at the end, so an interrupted or
failed run leaves either the old directory or the complete new one.

Every temporary is a directory whose first content is a marker naming what it
is for and which process made it (:data:`TEMPORARY_MARKER`); the next run
removes only marked temporaries of dead processes, never a file or folder that
merely has a similar name.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ._version import __version__
from .checks import check_name_lengths, name_limit, require_finite_result
from .errors import CheckpointError, InputError  # noqa: F401  CheckpointError: where callers catch it
from .plan import PLAN_FILE, Plan


log = logging.getLogger(__name__)


class OutputError(InputError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_is_an_error(target: Path) -> Iterator[None]:
    """A full disk (or quota) while writing ``target`` is one line naming it, not a traceback from deep inside
    a writer; the caller's ``finally`` removes the temporary, and the old output was never touched."""
    try:
        yield
    except OSError as err:
        if err.errno not in FULL_DISK:
            raise
        raise OutputError(f"cannot write {target}: {os.strerror(err.errno).lower()} (writing "
                          f"{err.filename or 'a file'}); the temporary was removed and the old output, if any, is "
                          "intact: free some space and run again") from None


def atomic_write(path: str | Path, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write ``data`` (bytes, text, or a function writing to a binary stream) to ``path`` atomically.

    The file is written inside a marked temporary sibling directory and renamed over ``path``. It is opened
    with mode ``xb`` (not ``mkstemp``) so the result gets the usual umask-derived permissions, not 0600.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)  # the docs promise missing parents are created
    remove_stale_temporaries(target)
    holder = make_temporary(target.parent, target.name)
    try:
        with disk_full_is_an_error(target):
            with open(holder / target.name, "xb") as stream:
                if callable(data):
                    data(stream)
                else:
                    stream.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.replace(holder / target.name, target)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
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
    check_name_lengths(path, option)
    return resolved_path(path, option)


def resolved_path(path: str | Path, option: str) -> Path:
    """``path`` with every link followed; a link loop (``loopA -> loopB -> loopA``) is the user's error."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError("Symlink loop ..."), 3.13 OSError
        raise OutputError(f"{option} {path} cannot be resolved: {err} (a symbolic link loop?); fix the links or "
                          "choose another path") from None


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


def real_locations(src: str | Path) -> tuple[Path | None, list[Path]]:
    """An input's real directory (None for a file) and the real location of every file it reads.

    A model directory may hold symlinks (``model.safetensors -> ../elsewhere/model.safetensors``, or a hub
    cache's snapshot links to its blobs): comparing directories alone would let an output replace the file
    the input reads through such a link. A path that does not exist (a hub id) reads no local file.
    """
    path = Path(src).expanduser()
    if not str(src).strip() or not path.exists():
        return None, []
    real = resolved_path(path, "the input")
    if not real.is_dir():
        return None, [real]
    return real, [real, *(entry.resolve() for entry in path.rglob("*") if entry.is_file())]


def refuse_overlap(resolved: Path, inputs: Iterable[str | Path], option: str) -> None:
    """An output may not be, contain or lie inside an input directory, nor be or contain the real location
    of any file an input reads (links followed)."""
    for src in inputs:
        directory, files = real_locations(src)
        if directory is not None and (resolved == directory or directory.is_relative_to(resolved)
                                      or resolved.is_relative_to(directory)):
            raise OutputError(f"{option} {resolved} overlaps the input model {directory}; choose a new directory "
                              "(depthprune never writes into or over its input)")
        for real in files:
            if real == resolved or real.is_relative_to(resolved):
                raise OutputError(f"{option} {resolved} would replace {real}, which the input {src} reads "
                                  "(through a link); choose a new path (depthprune never writes over its input)")


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
    refuse_overlap(resolved, inputs, option)
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


def check_output_file(path: str | Path, *, option: str = "--json", suffix: str = ".json",
                      inputs: Iterable[str | Path] = ()) -> Path:
    """Check a single result file a command will write: a path ending in ``suffix`` (``.json``, ``.yaml``)
    outside any model directory that is new or a result depthprune wrote earlier, and no file ``inputs``
    read."""
    resolved = _resolve(path, option)
    _refuse_inside_model(resolved.parent, option)
    refuse_overlap(resolved, inputs, option)
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
    require_finite_result(data, f"the result for {path}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_json(target, {"written_by": f"depthprune {__version__}", **data})


def prepare_dir(out: Path, kind: str) -> Path:
    """Create (or keep) an output directory written in place (scores, analysis, bench) and mark it."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        mark(out, kind)
    return out


# ---------------------------------------------------------------- temporaries, and leftovers of killed runs

TEMPORARY_MARKER = ".depthprune-temporary"
"""File written into every temporary directory the moment it exists: JSON naming the output it is for, the
process and the host that made it. Only directories carrying it are ever removed as leftovers."""


def _fit(name: str, size: int) -> str:
    """``name`` cut to at most ``size`` bytes of UTF-8 (never inside a character)."""
    return name.encode("utf-8")[: max(size, 1)].decode("utf-8", "ignore") or "x"


def _temporary_name(parent: Path, name: str, role: str, pid: int, token: str) -> str:
    """The name of a temporary for the output ``name``: ``.NAME.ROLE-PID-TOKEN``, ``NAME`` shortened to fit."""
    suffix = f".{role}-{pid}-{token}"
    return f".{_fit(name, name_limit(parent) - 1 - len(suffix))}{suffix}"


TEMPORARY_NAME = re.compile(r"\..+\.(?P<role>tmp|old)-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{8})")
"""What :func:`make_temporary` names a temporary (the output's name is checked against its marker)."""

LEFTOVER_FILES = re.compile(r".+\.(safetensors|json|jinja|md|model|bin|pt|pth|yaml|gguf|png|npy)"
                            r"|merges\.txt|vocab\.txt|\.depthprune(-temporary)?")
"""The names of the files depthprune writes into a temporary (a checkpoint, its tokenizer, reports and figures,
Trainer state in scratch space): a leftover holding any other file has been added to by someone else."""


def make_temporary(parent: Path, name: str, role: str = "tmp") -> Path:
    """A new marked temporary directory ``.NAME.ROLE-PID-RANDOM`` in ``parent`` for the output ``name``.

    ``NAME`` is shortened when the whole would exceed the file system's limit on names (the marker, not the
    name, says what the temporary is for).
    """
    for _ in range(100):
        path = parent / _temporary_name(parent, name, role, os.getpid(), uuid.uuid4().hex[:8])
        try:
            path.mkdir()
        except FileExistsError:
            continue
        with open(path / TEMPORARY_MARKER, "x", encoding="utf-8") as stream:
            json.dump({"written_by": f"depthprune {__version__}", "temporary_for": name, "pid": os.getpid(),
                       "host": socket.gethostname()}, stream)
        return path
    raise FileExistsError(f"could not create a temporary directory in {parent}")


def _owner(entry: Path) -> dict[str, Any] | None:
    """What a temporary directory's marker says, or None for anything depthprune did not mark as one."""
    if entry.is_symlink() or not entry.is_dir():
        return None
    try:
        with open(entry / TEMPORARY_MARKER, encoding="utf-8") as stream:
            data = json.loads(stream.read(4096))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _named_as_made(entry: Path, owner: dict[str, Any]) -> bool:
    """``entry`` still carries the name :func:`make_temporary` gave it for the output its marker names, by the
    process its marker names (a leftover the user renamed, ``.out-rescued``, is theirs now)."""
    found = TEMPORARY_NAME.fullmatch(entry.name)
    if found is None or not isinstance(owner.get("temporary_for"), str) or str(owner.get("pid")) != found["pid"]:
        return False
    return entry.name == _temporary_name(entry.parent, owner["temporary_for"], found["role"], int(found["pid"]),
                                         found["token"])


def _foreign_file(entry: Path, output_name: str) -> Path | None:
    """A file in the leftover that depthprune does not write (the output it was replacing, under the output's
    own name, aside), or None: a file someone else put there (``notes.txt``) keeps the folder."""
    for path in entry.rglob("*"):
        if path.relative_to(entry).parts[0] == output_name or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink() or not LEFTOVER_FILES.fullmatch(path.name):
            return path
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries a killed run left beside ``target``: hidden directories whose marker says they
    were for ``target``, made on this host by a process that is gone, still named as they were made and
    holding only files depthprune writes. Returns what was removed."""
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    host = socket.gethostname()
    for entry in target.parent.iterdir():
        if not entry.name.startswith(".") or entry.name == target.name:
            continue
        owner = _owner(entry)
        if owner is None or owner.get("temporary_for") != target.name or owner.get("host") != host:
            continue
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or _pid_alive(pid):
            continue
        if not _named_as_made(entry, owner):
            log.warning("left %s alone: it was renamed, so it is no longer depthprune's temporary", entry)
            continue
        foreign = _foreign_file(entry, target.name)
        if foreign is not None:
            log.warning("left %s alone: it holds %s, which depthprune did not write", entry, foreign)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.warning("removed %s, left by an interrupted run", entry)
    return removed


@contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False, kind: str = "checkpoint",
                     verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` when the block succeeds (and is marked as ``kind``).

    ``verify(directory)`` runs first and what it refuses is never committed (checkpoints pass
    :func:`~depthprune.models.validate.verify_checkpoint`: :func:`depthprune.saving.atomic_checkpoint`).
    Temporaries are marked (:func:`make_temporary`), so the next run writing ``out`` removes what a killed run
    left.
    """
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = make_temporary(out.parent, out.name)
    try:
        with disk_full_is_an_error(out):
            yield tmp
            if verify is not None:
                verify(tmp)
            mark(tmp, kind)
            _apply_umask(tmp)
            if out.exists():
                if any(out.iterdir()) and not (overwrite and kind_of(out) == kind):
                    raise OutputError(f"{out} appeared while writing; not replacing it")
                trash = make_temporary(out.parent, out.name, "old")
                os.replace(out, trash / out.name)
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out)
            (out / TEMPORARY_MARKER).unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; give them the user's usual modes."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_beside(directory: Path, plan: Plan | None = None, *, extra_json: dict[str, Any] | None = None,
                 writers: list[Callable[[Path], Any]] = ()) -> None:
    """The files written beside a checkpoint's weights: the plan, extra JSON files, then ``writers``."""
    if plan is not None:
        write_json(directory / PLAN_FILE, plan.to_dict())
    for name, data in (extra_json or {}).items():
        write_json(directory / name, data)
    for writer in writers:
        writer(directory)
