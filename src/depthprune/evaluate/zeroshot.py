"""Zero-shot evaluation through lm-evaluation-harness.

Every number returned here comes from ``lm_eval.simple_evaluate``: this module
only picks which metric to report, so results stay comparable with papers that
ran the harness directly.

Offline by default
------------------
Built-in lm-eval tasks download their data from the Hugging Face Hub.  Without
network ``datasets`` retries for tens of seconds before giving up, so unless the
user set ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` the call runs with both
forced on (environment *and* the already-imported ``datasets`` /
``huggingface_hub`` flags, which are read at import time), and a task that needs
the Hub fails at once with :class:`HubTaskUnavailableError`.  Datasets already in
the local HF cache still load.

Local PIQA
----------
``piqa_local`` is lm-eval's ``piqa`` task reading PIQA's release files from disk
(``valid.jsonl`` + ``valid-labels.lst``; the directory comes from ``piqa_dir`` or
``$DEPTHPRUNE_PIQA_DIR``).  lm-eval 0.4.13 hands ``dataset_kwargs`` to
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

import functools
import hashlib
import json
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import DepthpruneError, InputError, MissingInputError
from ..io import atomic_write
from ..paths import cache_dir

PAPER_TASKS: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}
"""The seven ShortGPT / SLM / LaCo zero-shot tasks and the metric each paper reports."""

PIQA_LOCAL_TASK = "piqa_local"
LOCAL_TASK_METRICS: dict[str, str] = {PIQA_LOCAL_TASK: PAPER_TASKS["piqa"]}
PIQA_DIR_ENV = "DEPTHPRUNE_PIQA_DIR"
PIQA_FIELDS = ("goal", "sol1", "sol2")
"""What lm-eval's piqa task reads from every example."""
FALLBACK_METRIC = "acc"

_OFFLINE_ENV_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_PIQA_TEMPLATE = Path(__file__).resolve().parents[1] / "tasks" / "piqa_local.yaml"
_RAW_RESULT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "versions",
    "n-shot",
    "n-samples",
    "higher_is_better",
)


class HubTaskUnavailableError(DepthpruneError, RuntimeError):
    """A requested task needs data from the Hugging Face Hub, which is unreachable."""


class PiqaDataError(MissingInputError):
    """PIQA release files are missing or inconsistent."""


@dataclass
class TaskScore:
    """The one metric reported for a task, as computed by lm-eval."""

    task: str
    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool = True


@dataclass
class ZeroShotResult:
    """Reported metric per task, their mean, and what produced them."""

    scores: dict[str, TaskScore]
    mean: float
    raw: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return {name: score.value for name, score in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": {name: asdict(score) for name, score in self.scores.items()},
            "mean": self.mean,
            "raw": self.raw,
            "settings": self.settings,
        }


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


@contextmanager
def hub_offline() -> Iterator[bool]:
    """Force HF offline mode for the block unless the user chose a mode; yields whether it forced.

    ``datasets`` and ``huggingface_hub`` read the variables once at import, so
    setting ``os.environ`` alone is too late once lm-eval is imported; the
    module-level flags are patched as well, and everything is restored after.
    """
    if any(var in os.environ for var in _OFFLINE_ENV_VARS):
        yield False
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    for var in _OFFLINE_ENV_VARS:
        os.environ[var] = "1"
    ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        for var in _OFFLINE_ENV_VARS:
            os.environ.pop(var, None)
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _is_hub_failure(exc: BaseException) -> bool:
    """True if the error (or anything in its cause chain) is a Hub/network failure."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    hub_errors = (
        ConnectionError,
        TimeoutError,
        DatasetNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, hub_errors):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _hub_error(tasks: Sequence[str], exc: BaseException) -> HubTaskUnavailableError:
    hub_tasks = [t for t in tasks if t != PIQA_LOCAL_TASK]
    return HubTaskUnavailableError(
        f"Could not load the data of task(s) {hub_tasks}: built-in lm-eval tasks download "
        f"their datasets from the Hugging Face Hub, which is not reachable (offline mode is "
        f"forced unless HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set). Either run with network "
        f"access (export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0) or with the dataset already "
        f"in the local HF cache; or point --task-dir (task_dir=) at a folder of lm-eval task "
        f"YAMLs that read local files (dataset_path: json, dataset_kwargs.data_files with "
        f"absolute paths); or use the bundled '{PIQA_LOCAL_TASK}' task with --piqa-dir "
        f"(piqa_dir=) or ${PIQA_DIR_ENV} set to PIQA's valid.jsonl + valid-labels.lst. "
        f"Underlying error: {type(exc).__name__}: {exc}"
    )


def _metric_value(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metric_names(entry: dict[str, Any]) -> list[str]:
    """Metric names in lm-eval's order; keys look like ``acc,none`` / ``acc_stderr,none``."""
    names = []
    for key in entry:
        name = key.split(",", 1)[0]
        if "," in key and not name.endswith("_stderr") and name not in names:
            names.append(name)
    return names


def pick_score(task: str, entry: dict[str, Any], directions: dict[str, Any] | None = None) -> TaskScore:
    """Paper metric for paper tasks; ``acc`` or else lm-eval's first metric for anything else.

    ``directions`` is lm-eval's ``higher_is_better`` entry for the task (metric -> bool).
    """
    available = _metric_names(entry)
    wanted = PAPER_TASKS.get(task) or LOCAL_TASK_METRICS.get(task)
    if wanted is None:
        wanted = FALLBACK_METRIC if FALLBACK_METRIC in available else (available[0] if available else None)
    if wanted is None or wanted not in available:
        raise ValueError(f"task {task!r}: metric {wanted!r} not in lm-eval results {sorted(entry)}")
    key = next(k for k in entry if k.split(",", 1)[0] == wanted)
    filter_name = key.split(",", 1)[1]
    value = _metric_value(entry, key)
    if value is None:
        raise ValueError(f"task {task!r}: lm-eval returned non-numeric {key}={entry[key]!r}")
    higher = (directions or {}).get(wanted, True)
    return TaskScore(task, wanted, value, _metric_value(entry, f"{wanted}_stderr,{filter_name}"),
                     bool(higher) if higher is not None else True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    try:
        return _jsonable(obj.item())
    except (AttributeError, ValueError):
        return str(obj)


def _include_paths(
    tasks: Sequence[str], task_dir: str | os.PathLike[str] | None, piqa_dir: str | os.PathLike[str] | None
) -> list[str]:
    """lm-eval include paths for ``tasks``; materialises ``piqa_local`` when it is asked for."""
    paths = []
    if task_dir is not None:
        if not Path(task_dir).is_dir():
            raise MissingInputError(f"task directory {task_dir} does not exist")
        paths.append(str(Path(task_dir).resolve()))
    if PIQA_LOCAL_TASK in tasks:
        resolved = resolve_piqa_dir(piqa_dir)
        if resolved is None:
            raise PiqaDataError(
                f"task '{PIQA_LOCAL_TASK}' needs PIQA's files: pass piqa_dir (--piqa-dir) "
                f"or set ${PIQA_DIR_ENV} to a folder with valid.jsonl and valid-labels.lst"
            )
        paths.append(str(prepare_piqa_local(resolved, task_cache_dir())))
    return paths


@functools.lru_cache(maxsize=8)
def _full_task_manager(include_paths: tuple[str, ...]) -> Any:
    """Built-in index plus include paths, built once per process (dense and pruned runs share it).

    Edits to YAMLs under a ``task_dir`` made while the process runs are not picked up.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


def _task_manager(tasks: Sequence[str], include_paths: list[str]) -> Any:
    """Index only the include paths when they define every requested task.

    Indexing lm-eval's ~15k built-in YAMLs takes seconds; a purely local run
    (e.g. ``piqa_local``) doesn't need it.  Only leaf tasks qualify, since a
    local group may name built-in subtasks.
    """
    from lm_eval.tasks import TaskManager

    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    manager = _full_task_manager(tuple(include_paths))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InputError(
            f"unknown lm-eval task(s) {unknown}; use a built-in task name, a task defined in "
            f"--task-dir, or '{PIQA_LOCAL_TASK}'"
        )
    return manager


def check_tasks(
    tasks: Sequence[str],
    *,
    task_dir: str | os.PathLike[str] | None = None,
    piqa_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Fail now, not after an hour of pruning, on what can be checked without a model.

    Checks that ``tasks`` is non-empty, the task and PIQA folders exist and hold
    what they should, and lm-eval knows every task name (indexing the built-in
    tasks takes a few seconds unless only local tasks are asked for).  Whether a
    Hub task's data is reachable is only known when it loads; that fails fast
    with :class:`HubTaskUnavailableError`.  Returns the include paths.
    """
    task_list = list(tasks)
    if not task_list:
        raise InputError("no tasks given: name at least one lm-eval task, e.g. piqa_local")
    include_paths = _include_paths(task_list, task_dir, piqa_dir)
    _task_manager(task_list, include_paths)
    return include_paths


@functools.cache
def _quiet_hflm() -> type:
    """lm-eval's HF model with its per-request progress bars switched off (numbers unchanged)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


@contextmanager
def _lm_eval_silenced(silence: bool) -> Iterator[None]:
    """Without progress: also lm-eval's request-building bars and its warnings about how it was called
    (errors still show)."""
    if not silence:
        yield
        return
    import logging

    import lm_eval.api.task as task_module

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    bar = task_module.tqdm
    task_module.tqdm = functools.partial(bar, disable=True)
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        task_module.tqdm = bar
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    task_dir: str | os.PathLike[str] | None = None,
    piqa_dir: str | os.PathLike[str] | None = None,
    seed: int = 1234,
    progress: bool = True,
) -> ZeroShotResult:
    """Run lm-eval on an in-memory HF model and report one metric per task.

    ``tasks`` defaults to :data:`PAPER_TASKS`.  Paper tasks report the paper's
    metric, ``piqa_local`` reports ``acc`` like ``piqa``; any other task reports
    ``acc`` when lm-eval produced it and otherwise the first metric in lm-eval's
    output.  ``limit`` is lm-eval's: the first N documents (or a fraction) of
    each task.  ``task_dir`` is an extra lm-eval ``include_path``.  With
    ``num_fewshot > 0``, ``piqa_local`` draws examples from PIQA's train split
    when ``train.jsonl`` + ``train-labels.lst`` are in the PIQA folder, and
    otherwise (lm-eval's fallback) from the validation split being scored.
    ``progress=False`` hides lm-eval's per-request progress bars.

    Raises :class:`HubTaskUnavailableError` when a task's data is only on the
    Hub, :class:`PiqaDataError` for missing/inconsistent PIQA files, and
    ``ValueError`` for task names lm-eval doesn't know.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_list = list(tasks) if tasks is not None else list(PAPER_TASKS)
    if not task_list:
        raise InputError("no tasks given: name at least one lm-eval task, e.g. piqa_local")
    include_paths = _include_paths(task_list, task_dir, piqa_dir)

    with hub_offline() as forced_offline, _lm_eval_silenced(not progress):
        task_manager = _task_manager(task_list, include_paths)
        lm_class = HFLM if progress else _quiet_hflm()
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_list,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as exc:
            if _is_hub_failure(exc):
                raise _hub_error(task_list, exc) from exc
            raise

    if output is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results (non-zero rank?)")
    per_task = {**output.get("groups", {}), **output["results"]}
    missing = [t for t in task_list if t not in per_task]
    if missing:
        raise InputError(
            f"lm-eval produced no result named {missing} (a tag expands to its tasks without "
            f"an aggregate); request the individual tasks instead"
        )
    directions = output.get("higher_is_better", {})
    scores = {task: pick_score(task, per_task[task], directions.get(task)) for task in task_list}
    return ZeroShotResult(
        scores=scores,
        mean=statistics.fmean(s.value for s in scores.values()),
        raw=_jsonable({k: output[k] for k in _RAW_RESULT_KEYS if k in output}),
        settings={
            "tasks": task_list,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "seed": seed,
            "include_paths": include_paths,
            "forced_offline": forced_offline,
            "lm_eval_version": lm_eval.__version__,
        },
    )
