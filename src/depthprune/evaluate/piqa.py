"""The ``piqa_local`` task: lm-eval's ``piqa`` reading PIQA's release files from disk instead of the Hub.

PIQA ships ``valid.jsonl`` + ``valid-labels.lst`` (questions and labels in two
line-aligned files); the directory comes from ``piqa_dir`` or
``$DEPTHPRUNE_PIQA_DIR``.  lm-eval 0.4.13 hands ``dataset_kwargs`` to
``datasets.load_dataset`` unchanged, so a relative ``data_files`` resolves
against the *current working directory*, not the YAML, and no environment
variables are expanded; ``!function`` only resolves Python callables next to
the YAML (a ``custom_dataset`` loader would work but means another module to
ship and locate).  Hence :func:`prepare_piqa_local` writes, per content
hash, a directory holding the merged JSONL plus a rendered copy of
``depthprune/tasks/piqa_local.yaml`` whose ``data_files`` is that JSONL's
absolute path; that directory is what we pass as ``include_path``.  The
directory lives under ``tasks/`` in depthprune's cache
(:func:`depthprune.paths.cache_dir`: ``$DEPTHPRUNE_CACHE``, default
``~/.cache/depthprune``), never in the repo.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from ..errors import MissingInputError
from ..io import atomic_write
from ..paths import cache_dir

PIQA_LOCAL_TASK = "piqa_local"
PIQA_DIR_ENV = "DEPTHPRUNE_PIQA_DIR"
PIQA_FIELDS = ("goal", "sol1", "sol2")
"""What lm-eval's piqa task reads from every example."""

_PIQA_TEMPLATE = Path(__file__).resolve().parents[1] / "tasks" / "piqa_local.yaml"


class PiqaDataError(MissingInputError):
    """PIQA release files are missing or inconsistent."""


def task_cache_dir() -> Path:
    """Where rendered task YAMLs and merged data go: ``tasks/`` in depthprune's one cache."""
    return cache_dir() / "tasks"


def resolve_piqa_dir(piqa_dir: str | os.PathLike[str] | None) -> Path | None:
    """The explicit argument wins over ``$DEPTHPRUNE_PIQA_DIR``."""
    if piqa_dir is not None:
        return Path(piqa_dir)
    env = os.environ.get(PIQA_DIR_ENV)
    return Path(env) if env else None


def _merge_split(piqa_dir: Path, split: str) -> bytes:
    """PIQA ships questions and labels in two line-aligned files; lm-eval wants one."""
    questions = piqa_dir / f"{split}.jsonl"
    labels = piqa_dir / f"{split}-labels.lst"
    for path in (questions, labels):
        if not path.is_file():
            raise PiqaDataError(
                f"PIQA file {path} not found; piqa_dir must contain PIQA's release "
                f"files {split}.jsonl and {split}-labels.lst"
            )
    from ..data.calibration import read_jsonl

    try:
        docs = read_jsonl(questions.read_text(encoding="utf-8"))
        l_lines = [ln.strip() for ln in labels.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as err:
        raise PiqaDataError(f"PIQA's files in {piqa_dir} are not UTF-8 text ({err}); restore the release "
                            "files") from None
    except json.JSONDecodeError as err:
        raise PiqaDataError(f"{questions}: line {err.lineno} is not valid JSON ({err.msg}, column {err.colno}); "
                            "restore PIQA's release file") from None
    if len(docs) != len(l_lines):
        raise PiqaDataError(
            f"{questions} has {len(docs)} examples but {labels} has {len(l_lines)} labels"
        )
    out = []
    for lineno, ((q_lineno, doc), label) in enumerate(zip(docs, l_lines), start=1):
        if label not in ("0", "1"):
            raise PiqaDataError(f"{labels}:{lineno}: expected label 0 or 1, got {label!r}")
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in PIQA_FIELDS):
            raise PiqaDataError(f"{questions}: line {q_lineno} is not a PIQA example (an object with string "
                                f"fields {', '.join(PIQA_FIELDS)}); restore PIQA's release file")
        out.append(json.dumps({**doc, "label": int(label)}, ensure_ascii=False))
    return ("\n".join(out) + "\n").encode("utf-8")


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic and idempotent, so concurrent runs sharing a cache dir never see half a file."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, data)


def _render_piqa_yaml(splits: dict[str, Path]) -> bytes:
    config = yaml.safe_load(_PIQA_TEMPLATE.read_text(encoding="utf-8"))
    config["dataset_kwargs"] = {"data_files": {name: str(p) for name, p in splits.items()}}
    config["training_split"] = "train" if "train" in splits else None
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode("utf-8")


def prepare_piqa_local(
    piqa_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str]
) -> Path:
    """Materialise the ``piqa_local`` task and return the directory to use as lm-eval ``include_path``.

    The directory is ``work_dir/piqa_local-<hash of the merged data>`` and holds
    ``piqa_local.yaml`` plus ``valid.jsonl`` (and ``train.jsonl`` when PIQA's
    train files are present, so few-shot examples come from train as in the
    built-in task).  Keying on content keeps reruns from rewriting files, which
    would invalidate the ``datasets`` cache, and keeps different PIQA copies apart.
    """
    piqa_dir = Path(piqa_dir)
    if not piqa_dir.is_dir():
        raise PiqaDataError(
            f"PIQA directory {piqa_dir} does not exist; pass piqa_dir or set "
            f"${PIQA_DIR_ENV} to a folder with valid.jsonl and valid-labels.lst"
        )
    data = {"validation": _merge_split(piqa_dir, "valid")}
    if (piqa_dir / "train.jsonl").is_file() and (piqa_dir / "train-labels.lst").is_file():
        data["train"] = _merge_split(piqa_dir, "train")

    digest = hashlib.sha256(b"".join(data[k] for k in sorted(data))).hexdigest()[:16]
    task_dir = Path(work_dir).resolve() / f"{PIQA_LOCAL_TASK}-{digest}"
    task_dir.mkdir(parents=True, exist_ok=True)

    files = {"validation": task_dir / "valid.jsonl", "train": task_dir / "train.jsonl"}
    splits = {name: files[name] for name in data}
    for name, payload in data.items():
        _write_if_changed(splits[name], payload)
    _write_if_changed(task_dir / f"{PIQA_LOCAL_TASK}.yaml", _render_piqa_yaml(splits))
    return task_dir


def piqa_include_path(piqa_dir: str | os.PathLike[str] | None) -> Path:
    """The ``piqa_local`` task's include path, from ``piqa_dir`` or ``$DEPTHPRUNE_PIQA_DIR`` (one of them is
    needed), materialised in :func:`task_cache_dir`."""
    resolved = resolve_piqa_dir(piqa_dir)
    if resolved is None:
        raise PiqaDataError(
            f"task '{PIQA_LOCAL_TASK}' needs PIQA's files: pass piqa_dir (--piqa-dir) "
            f"or set ${PIQA_DIR_ENV} to a folder with valid.jsonl and valid-labels.lst"
        )
    return prepare_piqa_local(resolved, task_cache_dir())
