"""Zero-shot evaluation through lm-evaluation-harness.

Every number returned here comes from ``lm_eval.simple_evaluate``: this module
only picks which metric to report, so results stay comparable with papers that
ran the harness directly.

Two concerns live beside this module: :mod:`.offline` makes lm-eval fail at
once, with one clear line, when a task's data is only on the Hugging Face Hub
(offline mode is forced unless the user chose one), and :mod:`.piqa` provides
the ``piqa_local`` task (lm-eval's ``piqa`` on PIQA's release files on disk).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingInputError
from .offline import HubTaskUnavailableError, hub_error, hub_offline, is_hub_failure
from .piqa import PIQA_LOCAL_TASK, PiqaDataError, piqa_include_path

__all__ = ["PAPER_TASKS", "HubTaskUnavailableError", "PiqaDataError", "TaskScore", "ZeroShotResult", "check_tasks",
           "evaluate_zeroshot", "pick_score"]

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

LOCAL_TASK_METRICS: dict[str, str] = {PIQA_LOCAL_TASK: PAPER_TASKS["piqa"]}
FALLBACK_METRIC = "acc"

_RAW_RESULT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "versions",
    "n-shot",
    "n-samples",
    "higher_is_better",
)


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
        paths.append(str(piqa_include_path(piqa_dir)))
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
            if is_hub_failure(exc):
                raise hub_error(task_list, exc) from exc
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
