"""Publish a pruned checkpoint on the Hugging Face Hub with a generated model card.

The card (``README.md``) is written from the checkpoint's own ``report.json``
and ``depthprune_plan.json``: base model, method, layers removed and merged,
the before/after metric table, the command and settings, the depthprune
version, and a licence note. A command with ``--push-to-hub`` writes it into
the checkpoint inside the atomic save, then uploads the finished directory
with the plain ``huggingface_hub`` calls (``create_repo``, ``upload_folder``).
:func:`upload_plan` lists exactly what would be uploaded, so a dry run needs
no network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import DepthpruneError, InputError
from ..io import MARKER, atomic_write
from ..plan import PLAN_FILE, Plan
from ..run_record import RunRecord
from ..report import RUN_REPORT_JSON, format_number

CARD_FILE = "README.md"


class HubError(DepthpruneError):
    """The upload did not happen (no login, no network, no permission); the checkpoint on disk is complete."""


def check_repo_id(repo: str, option: str = "--push-to-hub") -> str:
    """A valid Hub repository id (``name`` or ``owner/name``), checked before any work; ``option`` is the
    option that gave it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo.strip():
        raise InputError(f"{option} is empty (an unset shell variable?); give the Hub repository as owner/name")
    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise InputError(f"{option} {repo!r} is not a valid Hub repository id ({err})") from None
    return repo


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hub id (owner/name, not a path), for the card's ``base_model``."""
    if name and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not Path(name).expanduser().exists():
        return name
    return None


def model_card(directory: str | Path, *, command: str | None = None, repo: str | None = None) -> str:
    """The model card of the checkpoint in ``directory`` (from its report and plan)."""
    directory = Path(directory)
    report = _read_json(directory / RUN_REPORT_JSON)
    plan_data = _read_json(directory / PLAN_FILE)
    plan = Plan.from_dict(plan_data, where=str(directory / PLAN_FILE)) if plan_data else None
    run = RunRecord.of_checkpoint(directory)
    base = (run.source if run else None) or report.get("model")
    hub_base = _hub_id(base)
    front = ["---", "library_name: transformers", "tags:", "  - depthprune", "  - pruned", "  - layer-pruning"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    title = repo or directory.name
    parts = ["\n".join(front), f"\n# {title}\n",
             f"A depth-pruned version of `{base or 'an unrecorded model'}`, made with "
             f"[depthprune](https://pypi.org/project/depthprune/) {plan.version if plan else __version__}. It is a "
             "plain transformers checkpoint: `AutoModelForCausalLM.from_pretrained` loads it without custom code.\n"]
    layers = report.get("layers") or {}
    params = report.get("parameters") or {}
    summary = []
    if plan is not None:
        summary += [f"- method: `{plan.method}`", f"- layers: {plan.num_layers} -> {plan.num_layers_after}",
                    f"- removed layers (original indices): {plan.remove or 'none'}",
                    "- merged layers: " + (", ".join(f"{m.low}..{m.high} ({m.operator})" for m in plan.merges)
                                           or "none")]
        if plan.params:
            summary.append(f"- method parameters: `{json.dumps(plan.params, default=str)}`")
    elif layers:
        summary.append(f"- layers: {layers.get('before')} -> {layers.get('after')}")
    if params.get("before") and params.get("after"):
        summary.append(f"- parameters: {params['before']:,} -> {params['after']:,}")
    for stage in (run.stages if run else report.get("stages") or []):
        if stage.get("stage") != "depth":
            summary.append(f"- later stage: {stage.get('summary', stage.get('stage'))}")
    parts.append("## What was done\n\n" + ("\n".join(summary) if summary else "No plan was recorded.") + "\n")
    metrics = report.get("metrics") or {}
    if metrics:
        rows = ["| metric | before | after |", "|---|---|---|"]
        rows += [f"| {name} ({'higher' if e.get('higher_is_better') else 'lower'} is better) | "
                 f"{format_number(e.get('before'))} | {format_number(e.get('after'))} |" for name, e in metrics.items()]
        parts.append("## Evaluation\n\n" + "\n".join(rows) + "\n")
    else:
        parts.append("## Evaluation\n\nNothing was measured by the run that made this checkpoint.\n")
    settings = report.get("settings") or {}
    how = [f"```\n{command}\n```"] if command else []
    how += [f"- {k}: `{json.dumps(v, default=str)}`" for k, v in settings.items()]
    parts.append("## How it was made\n\n" + ("\n".join(how) if how else "Through the Python API.") +
                 "\n\n`depthprune_plan.json`, `depthprune_run.json` and `report.json` in this repository hold every "
                 "number above.\n")
    parts.append("## License\n\nThis checkpoint is derived from "
                 f"`{base or 'its base model'}` and is subject to that model's license and use policy; check them "
                 "before use. depthprune itself adds no terms.\n")
    return "\n".join(parts)


def card_writer(command: str | None = None, repo: str | None = None):
    """A checkpoint writer putting the model card into the directory being saved (after the report)."""

    def write(directory: Path) -> None:
        atomic_write(Path(directory) / CARD_FILE, model_card(directory, command=command, repo=repo))

    return write


def upload_plan(directory: str | Path) -> list[str]:
    """Every file that is uploaded, relative to ``directory``: all of it but hidden files (the marker)."""
    directory = Path(directory)
    files = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.name != MARKER:
            files.append(rel.as_posix())
    return files


@dataclass
class PushResult:
    repo: str
    files: list[str]
    url: str | None = None
    uploaded: bool = False
    calls: list[str] = field(default_factory=list)


def push_checkpoint(directory: str | Path, repo: str, *, private: bool = False, token: str | None = None,
                    dry_run: bool = False, api: Any = None) -> PushResult:
    """Create ``repo`` (if needed) and upload the checkpoint in ``directory``: exactly :func:`upload_plan`'s
    files, in one commit. ``dry_run`` returns the plan without touching the network."""
    directory = Path(directory)
    check_repo_id(repo, "--repo")
    files = upload_plan(directory)
    if CARD_FILE not in files:
        raise InputError(f"{directory} has no {CARD_FILE} model card; write one with `depthprune export hub`")
    result = PushResult(repo, files)
    if dry_run:
        return result
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(directory),
                                   allow_patterns=files, commit_message=f"Upload pruned model (depthprune "
                                   f"{__version__})")
    except Exception as err:  # network, authentication and permission errors come in many types
        raise HubError(f"{directory} is saved, but the upload to {repo} failed ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''}); retry with `depthprune export hub "
                       f"{directory} --repo {repo}`") from err
    result.url = str(getattr(commit, "commit_url", None) or repo_url)
    result.uploaded = True
    return result


def ensure_card(directory: str | Path, *, command: str | None = None, repo: str | None = None) -> bool:
    """Write the model card into an existing checkpoint that lacks one; returns whether it wrote it."""
    path = Path(directory) / CARD_FILE
    if path.exists():
        return False
    atomic_write(path, model_card(directory, command=command, repo=repo))
    return True
