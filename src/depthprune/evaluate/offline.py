"""lm-eval without network: fail at once, and say what to do, when a task's data is only on the Hub.

Built-in lm-eval tasks download their data from the Hugging Face Hub.  Without
network ``datasets`` retries for tens of seconds before giving up, so unless the
user set ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` the call runs with both
forced on (:func:`hub_offline`: environment *and* the already-imported
``datasets`` / ``huggingface_hub`` flags, which are read at import time), and a
task that needs the Hub fails at once with :class:`HubTaskUnavailableError`
(:func:`is_hub_failure`, :func:`hub_error`).  Datasets already in the local HF
cache still load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import DepthpruneError
from .piqa import PIQA_DIR_ENV, PIQA_LOCAL_TASK

OFFLINE_ENV_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class HubTaskUnavailableError(DepthpruneError, RuntimeError):
    """A requested task needs data from the Hugging Face Hub, which is unreachable."""


@contextmanager
def hub_offline() -> Iterator[bool]:
    """Force HF offline mode for the block unless the user chose a mode; yields whether it forced.

    ``datasets`` and ``huggingface_hub`` read the variables once at import, so
    setting ``os.environ`` alone is too late once lm-eval is imported; the
    module-level flags are patched as well, and everything is restored after.
    """
    if any(var in os.environ for var in OFFLINE_ENV_VARS):
        yield False
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    for var in OFFLINE_ENV_VARS:
        os.environ[var] = "1"
    ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        for var in OFFLINE_ENV_VARS:
            os.environ.pop(var, None)
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def is_hub_failure(exc: BaseException) -> bool:
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


def hub_error(tasks: Sequence[str], exc: BaseException) -> HubTaskUnavailableError:
    """The one-line error for ``tasks`` whose data could not be loaded: what failed and the ways out."""
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
