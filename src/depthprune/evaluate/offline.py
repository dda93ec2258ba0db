"""lm-eval without network: fail at once, and say what to do, when a task's data is only on the Hub.

Built-in lm-eval tasks download their data from the Hugging Face Hub.  Without
network ``datasets`` retries for tens of seconds before giving up, so unless the
user set ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` the call runs with both
forced on (:func:`depthprune.hub_access.hub_offline`: environment *and* the already-imported
``datasets`` / ``huggingface_hub`` flags, which are read at import time), and a
task that needs the Hub fails at once with :class:`HubTaskUnavailableError`
(:func:`is_hub_failure`, :func:`hub_error`).  Datasets already in the local HF
cache still load.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DepthpruneError
from ..hub_access import hub_offline
from .piqa import PIQA_DIR_ENV, PIQA_LOCAL_TASK


class HubTaskUnavailableError(DepthpruneError, RuntimeError):
    """A requested task needs data from the Hugging Face Hub, which is unreachable."""


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
