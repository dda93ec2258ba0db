"""Apply a plan on any backend: fit the plan's compensation, then remove and merge its layers.

This is the one place a plan is applied: a job's depth stage and the Python API's
:func:`apply_plan` both come here. Backends only offer what it needs: an in-memory model is pruned in place
(:mod:`.inplace`), a streamed one disk to disk into scratch space (:mod:`.streamed`) and streamed again from
there (:meth:`~depthprune.backend.StreamedBackend.adopt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backend import Backend, InMemoryBackend, StreamedBackend
from ..compensate import Compensation, Fitted, fit_compensation, get_fit
from ..data.calibration import Calibration, CalibrationSpec
from ..evaluate.perplexity import first_target_of
from ..plan import Plan, PlanError
from .inplace import surgery, write_overrides
from . import streamed


@dataclass
class Applied:
    """A plan applied: the pruned model (the same backend in memory, a new one streamed) and what its
    compensation fit recorded (one record per interface; empty for a plan without compensation)."""

    backend: Backend
    compensation: list[dict[str, Any]] = field(default_factory=list)


def fit_window_count(tokens: int, seq_len: int) -> int:
    """Calibration windows of ``seq_len`` tokens that hold at least ``tokens`` tokens (one at least)."""
    return max(1, -(-tokens // seq_len))


def compensation_windows(calibration: CalibrationSpec, tokenizer: Any, config: Compensation) -> Calibration:
    """The windows ``config`` fits on: its fit tokens of ``calibration``'s text, never its held-out windows."""
    tokens = config.fit_tokens(calibration.seq_len)
    return calibration.fit_windows(tokenizer, fit_window_count(tokens, calibration.seq_len), config.seed)


def sized_plan(backend: Backend, plan: Plan, calibration: CalibrationSpec) -> tuple[Plan, dict[str, Any]]:
    """``plan`` with the compensation settings its fit sizes from the unpruned ``backend`` and the plan itself
    (``layers``: its steps, from the weights it trains) fixed, before any window is drawn: the plan then records
    what was trained, and re-applying it trains the same. The second value says how they were sized (empty when
    nothing was)."""
    if not plan.compensation:
        return plan, {}
    size = get_fit(plan.compensation.fit).size
    if size is None:
        return plan, {}
    config, sizing = size(plan.compensation, backend, plan, calibration.seq_len,
                          lambda: calibration.fit_capacity(backend.tokenizer))
    return replace(plan, compensation=config), sizing


def fit_plan(backend: Backend, plan: Plan, calibration: CalibrationSpec, *, batch_size: int,
             progress: bool = False) -> Fitted:
    """Fit ``plan.compensation`` on the unpruned ``backend`` exactly as the job that made the plan did."""
    plan, _ = sized_plan(backend, plan, calibration)
    config = plan.compensation.validate()
    windows = compensation_windows(calibration, backend.tokenizer, config)
    return fit_compensation(backend, plan, backend.to_device(windows.batches(batch_size)), config,
                            first_target=first_target_of(windows), progress=progress)


def prune(backend: Backend, plan: Plan, overrides: dict[int, dict[str, torch.Tensor]] | None = None, *,
          scratch: str | Path | None = None, progress: bool = False) -> Backend:
    """``backend``'s model with ``plan``'s removals and merges, and ``overrides`` (new position -> parameter
    name inside the layer -> value, e.g. compensation folds) written into its layers.

    In memory the model is pruned in place (the same backend comes back); a streamed model is written disk to
    disk into ``scratch`` and streamed from there.
    """
    if isinstance(backend, StreamedBackend):
        if scratch is None:
            raise ValueError("a streamed model is pruned disk to disk: give the scratch directory to write into")
        target = Path(scratch) / "pruned"
        streamed.write_pruned_checkpoint(backend, plan, target, overrides=overrides, dtype=backend.save_dtype,
                                progress=progress)
        return backend.adopt(target, progress=progress)
    surgery(backend.model, plan)
    write_overrides(backend.model, overrides or {})
    return backend


def apply(backend: Backend, plan: Plan, calibration: CalibrationSpec | None = None, *, batch_size: int = 8,
          scratch: str | Path | None = None, progress: bool = False) -> Applied:
    """Apply ``plan`` to ``backend``: its compensation (re-fitted on ``calibration``'s fit windows, as the job
    that made it fitted it), then its removals and merges.

    A plan that compensates its gaps needs ``calibration`` and the backend's tokenizer; without them it is
    refused, never silently applied uncompensated.
    """
    if not plan.compensation:
        return Applied(prune(backend, plan, scratch=scratch, progress=progress))
    if calibration is None or backend.tokenizer is None:
        raise PlanError(
            f"this plan compensates its gaps ({plan.compensation.fit} fit): re-fitting needs the "
            "calibration text and the tokenizer; pass calibration=CalibrationSpec(...) (the settings in the "
            "checkpoint's report.json) and tokenizer=, or use the saved checkpoint itself")
    fitted = fit_plan(backend, plan, calibration, batch_size=batch_size, progress=progress)
    return Applied(prune(backend, plan, fitted.overrides, scratch=scratch, progress=progress), fitted.records)


def apply_plan(model: nn.Module, plan: Plan, *, calibration: CalibrationSpec | None = None, tokenizer: Any = None,
               batch_size: int = 8) -> nn.Module:
    """Prune ``model`` in place according to ``plan`` and return it (the Python API of :func:`apply`).

    A plan that compensates its gaps (``plan.compensation``) is applied with its maps re-fitted exactly as the
    job that made it fitted them: on the fit windows of ``calibration`` (the job's
    :class:`~depthprune.data.calibration.CalibrationSpec`, e.g. ``CalibrationSpec(**report["settings"]
    ["calibration"])``) tokenized by ``tokenizer``, so the result equals the saved checkpoint. Without them it
    refuses: a plan applied without its compensation would silently be another model.
    """
    apply(InMemoryBackend(model, tokenizer), plan, calibration, batch_size=batch_size)
    return model
