"""Run the comparison (:func:`run_bench`): check the inputs before any model loads, then one job per row
(the dense row first), each row cached in ``OUT/rows/`` under a fingerprint of the settings that change its
numbers, so a rerun with the same settings reuses it."""

from __future__ import annotations

import gc
import hashlib
import json
import platform
import re
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..compensate import FITS, Compensation
from ..data.calibration import CalibrationSpec
from ..errors import InputError
from ..evaluate.suite import Evaluation
from ..io import check_output_dir, prepare_dir, write_json
from ..job import DepthStage, Job, run_job
from ..methods import Target, build_options
from ..models.load import LoadedModel, check_context, load_model, local_config
from ..plan import Plan
from .render import write_results
from .results import DENSE, REFERENCE_FILE, ROWS_DIR, BenchResult, BenchRow


class BenchError(InputError):
    """Bench input that cannot work; raised before any model is loaded."""


def versions() -> dict[str, str]:
    """Versions that change numbers: results are only comparable when these match."""
    import lm_eval
    import torch
    import transformers

    from .. import __version__

    return {"depthprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "unknown"), "python": platform.python_version()}


def check_methods(methods: Sequence[str]) -> list[str]:
    from ..methods import METHODS

    names = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not names:
        raise BenchError(f"no methods given: pass --methods with some of {', '.join(METHODS)}")
    if DENSE in names:
        raise BenchError(f"'{DENSE}' is the baseline row and always included; leave it out of --methods")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method(s) {', '.join(unknown)} in --methods: use some of {', '.join(METHODS)}")
    return names


def check_compensations(compensations: Sequence[str]) -> list[str]:
    fits = list(dict.fromkeys(c.strip() for c in compensations if c.strip())) or ["none"]
    unknown = [f for f in fits if f != "none" and f not in FITS]
    if unknown:
        raise BenchError(f"--compensate {', '.join(unknown)}: use none or {', '.join(FITS)}")
    return fits


def check_ratios(ratios: Sequence[float]) -> list[float]:
    values = list(dict.fromkeys(float(r) for r in ratios))
    if not values:
        raise BenchError("no ratios given: pass --ratios such as 0.2,0.35")
    bad = [r for r in values if not 0.0 < r < 1.0]
    if bad:
        raise BenchError(f"--ratios must be fractions of layers to remove, between 0 and 1 (exclusive); got "
                         f"{', '.join(f'{r:g}' for r in bad)}")
    return values


def _row_file(out: Path, method: str, ratio: float | None, compensation: str = "none") -> Path:
    fit = "" if compensation == "none" else f"+{compensation}"
    stem = DENSE if ratio is None else f"{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}{fit}-{ratio:g}"
    return out / ROWS_DIR / f"{stem}.json"


def _settings_key(settings: dict[str, Any]) -> str:
    """Fingerprint of everything that changes a row's numbers; cached rows count only when it matches."""
    relevant = {k: settings[k] for k in ("model_path", "dtype", "device", "calibration", "evaluation",
                                         "method_options", "batch_size", "compensation")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cached(path: Path, key: str) -> BenchRow | None:
    if not path.is_file():
        return None
    try:
        row = BenchRow.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    return row if row.ok and row.settings_key == key else None


class _Session:
    """The model source and fresh copies of it on demand."""

    def __init__(self, model: str | LoadedModel, dtype: Any, device: str | None, progress: bool):
        from ..models.load import resolve_device, resolve_dtype, resolve_source

        self.given = model if isinstance(model, LoadedModel) else None
        self.progress = progress
        if self.given is not None:
            params = next(self.given.model.parameters())
            self.source, self.path, self.dtype = self.given.source, self.given.path, params.dtype
            self.device = "auto" if getattr(self.given.model, "hf_device_map", None) else str(params.device)
        else:
            self.source, self.device = str(model), device
            self.dtype = resolve_dtype(dtype, resolve_device(device))
            self.path = str(resolve_source(self.source))

    def dense(self) -> LoadedModel:
        """The caller's model if one was passed (it is only evaluated), else a fresh load."""
        return self.given if self.given is not None else self.fresh()

    def fresh(self) -> LoadedModel:
        gc.collect()
        return load_model(self.path, dtype=self.dtype, device=self.device, progress=self.progress)


def _row(method: str, ratio: float | None, compensation: str, session: _Session, job: Job, key: str) -> BenchRow:
    """Plan, apply and evaluate one (method, ratio, compensation), or evaluate the dense model; a pruned row's
    failure becomes its error (a broken method must not end a long comparison), the dense row's ends the run."""
    row = BenchRow(method, ratio, compensation, settings_key=key)
    start = time.perf_counter()
    try:
        loaded = session.dense() if ratio is None else session.fresh()
        row.timings_s["load"] = time.perf_counter() - start
        result = run_job(loaded, job)
        row.layers, row.params = result.layers["after"], result.parameters["after"]
        row.layers_removed = result.layers["before"] - result.layers["after"]
        after = result.after
        row.timings_s.update({**result.timings, **after.timings})
        if after.perplexity is not None:
            row.perplexity = after.perplexity.perplexity
        if after.divergence is not None:
            row.kl, row.top1 = after.divergence.kl, after.divergence.top1
        if after.zeroshot is not None:
            row.tasks, row.task_mean = after.zeroshot.metrics, after.zeroshot.mean
        row.metrics = after.values()
        if after.speed is not None:
            row.decode_tokens_per_s, row.prefill_latency_s = after.speed.decode_tokens_per_s, \
                after.speed.prefill_latency_s
        row.details = after.to_dict()
        if result.plan is not None:
            row.plan = {"summary": result.plan.summary(), "dropped": result.plan.dropped, **result.plan.to_dict()}
    except Exception as err:
        if ratio is None:
            raise
        row.error = f"{type(err).__name__}: {err}"
        row.details["traceback"] = traceback.format_exc()
    row.timings_s["total"] = time.perf_counter() - start
    return row


def run_bench(
    model: str | LoadedModel,
    methods: Sequence[str],
    ratios: Sequence[float],
    out: str | Path,
    *,
    calibration: CalibrationSpec | None = None,
    evaluation: Evaluation | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    compensations: Sequence[str] = ("none",),
    compensation: Compensation | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = "cpu",
    resume: bool = True,
    progress: bool = True,
) -> BenchResult:
    """Prune ``model`` with every method at every ratio, evaluate each and the dense model, write ``out``.

    ``model`` is a source for :func:`depthprune.load_model` or an already
    loaded, unpruned :class:`LoadedModel` (used as is for the dense row; each
    pruned row reloads from its ``path``). ``evaluation`` defaults to
    perplexity on the held-out default text. ``method_options`` maps a method
    name to its options (``{"slm": {"operator": "average"}}``); an option the
    method does not take is refused. Inputs are checked before any model is
    loaded. With ``resume`` (the default), rows already in ``out/rows/`` that
    were computed with the same settings are reused. Writes ``results.json``,
    ``results.md`` and ``results.png`` into ``out``.
    """
    from ..evaluate.suite import PerplexitySpec

    t0 = time.perf_counter()
    methods, ratios = check_methods(methods), check_ratios(ratios)
    calibration = (calibration or CalibrationSpec()).check()
    evaluation = (evaluation or Evaluation(perplexity=PerplexitySpec())).check()
    if evaluation.empty:
        raise BenchError("nothing to measure: enable perplexity, zero-shot tasks or speed")
    unknown = sorted(set(method_options or {}) - set(methods))
    if unknown:
        raise BenchError(f"options given for {', '.join(unknown)}, which is not among --methods")
    options = {m: build_options(m, (method_options or {}).get(m)) for m in methods}
    fits = check_compensations(compensations)
    base = compensation or Compensation()
    stages = {(m, r, f): DepthStage(m, Target(ratio=r), options[m],
                                    None if f == "none" else replace(base, fit=f).validate())
              for m in methods for r in ratios for f in (("none",) if m == "auto" else fits)}
    for stage in stages.values():
        stage.check()
    out = check_output_dir(out, inputs=[model.path if isinstance(model, LoadedModel) else model], kind="bench")
    session = _Session(model, dtype, device, progress)
    config = local_config(session.path)
    if config is not None:
        for option, length in Job(list(stages.values())[:1], calibration, evaluation).window_lengths():
            check_context(config, length, option)
        for stage in stages.values():
            stage.check(config)
    prepare_dir(out, "bench")
    (out / ROWS_DIR).mkdir(parents=True, exist_ok=True)
    if evaluation.divergence is not None:  # every row against the dense one: its distributions, kept in OUT
        evaluation.divergence.reference = evaluation.divergence.reference or session.source
        evaluation.divergence.cache_file = evaluation.divergence.cache_file or str(out / REFERENCE_FILE)
    settings = {
        "model": session.source, "model_path": session.path, "dtype": str(session.dtype),
        "device": session.device, "methods": methods, "ratios": ratios, "calibration": asdict(calibration),
        "evaluation": evaluation.to_dict(), "batch_size": batch_size,
        "method_options": {m: options[m].to_dict() for m in methods}, "compensations": fits,
        "compensation": base.to_dict(),
    }
    key = _settings_key(settings)
    todo: list[tuple[str, float | None, str]] = [(DENSE, None, "none"), *stages]
    done: dict[tuple[str, float | None, str], BenchRow] = {}
    plans: dict[tuple[str, float], Plan] = {}
    cached: list[str] = []
    with tqdm(todo, desc="bench", unit="row", disable=not progress) as bar:
        for method, ratio, fit in bar:
            path = _row_file(out, method, ratio, fit)
            row = _load_cached(path, key) if resume else None
            if row is not None and ratio is None and evaluation.divergence is not None:
                try:  # the dense row also stands for the reference the other rows are measured against
                    evaluation.prepare(session.source, session.path, first_is_input=False)
                except InputError:
                    row = None
            if row is not None:
                cached.append(row.name)
                bar.set_postfix_str(f"{row.name} (cached)")
            else:
                bar.set_postfix_str(method if ratio is None else f"{method}@{ratio:g}")
                if ratio is not None:
                    stages[method, ratio, fit].plan = plans.get((method, ratio))
                job = Job([] if ratio is None else [stages[method, ratio, fit]], calibration, evaluation,
                          evaluate_before=False, batch_size=batch_size, progress=False)
                row = _row(method, ratio, fit, session, job, key)
                write_json(path, row.to_dict())
                if row.error:
                    tqdm.write(f"{row.name} failed: {row.error}")
            done[(method, ratio, fit)] = row
            if row.ok and row.plan is not None and (method, ratio) not in plans:
                plans[method, ratio] = _uncompensated(row.plan)
    result = BenchResult(out, done[(DENSE, None, "none")], [done[t] for t in todo[1:]], settings, versions(),
                         time.perf_counter() - t0, cached)
    write_results(result)
    return result


def _uncompensated(plan: dict[str, Any]) -> Plan:
    """A row's plan without its compensation: the other compensation rows of that method and ratio re-apply it
    instead of planning again (methods are deterministic, so the plan would be the same)."""
    return replace(Plan.from_dict(plan), compensation=None)

