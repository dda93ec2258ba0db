"""A prune job for models larger than memory: plan from streamed statistics, streamed surgery, atomic save.

The same job description as the in-memory runner (:class:`~depthprune.job.Job`
with one :class:`~depthprune.job.DepthStage`), the same output (checkpoint,
``depthprune_plan.json``, ``report.md``/``report.json``, ``layer_scores.png``)
and the same :class:`~depthprune.job.JobResult`. What streaming cannot do yet
(methods that search with the whole model, width pruning, healing, lm-eval and
speed evaluation) is refused before any work, with a one-line error.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.calibration import Calibration
from ..io import atomic_directory, check_output_dir, write_json
from ..job import DepthStage, Job, JobResult
from ..methods import RunContext, build_options
from ..methods import laco, slm
from ..methods.angular import plan_angular
from ..methods.merging import run_threshold_search
from ..methods.shortgpt import plan_shortgpt
from ..methods.target import require
from ..models.arch import count_parameters
from ..models.load import check_context, resolve_dtype
from ..plan import PLAN_FILE, Plan, PlanError
from ..report import write_run_report
from ..evaluate.suite import EvalResult, Evaluation
from .checkpoint import StreamingError
from .model import StreamedModel, load_streamed
from .scoring import streamed_layer_statistics, streamed_perplexity
from .search import StreamedSimilarityEngine, streamed_sleb
from .surgery import DEFAULT_SHARD_SIZE, write_pruned_checkpoint

#: Methods that plan from streamed passes: layer statistics (shortgpt, angular), SLEB's layer-major rounds, or
#: the streamed similarity engine (slm, laco).
STREAMED_METHODS = ("shortgpt", "angular", "sleb", "slm", "laco")

Report = Callable[[str], None]


def check_streamable(job: Job) -> DepthStage:
    """The job's depth stage, or a one-line error naming what needs the in-memory path."""
    in_memory = "the in-memory path for now (pass --no-stream, or use a machine where the model fits)"
    others = [s.name for s in job.stages if not isinstance(s, DepthStage)]
    if others:
        flags = {"width": "--then-width", "heal": "--heal"}
        raise StreamingError(f"{' and '.join(flags.get(n, n) for n in others)} need {in_memory}; streaming runs "
                             "a depth stage only")
    if len(job.stages) != 1:
        raise StreamingError(f"streaming runs exactly one depth stage, got {len(job.stages)}")
    stage = job.stages[0]
    if stage.method not in STREAMED_METHODS:
        raise StreamingError(f"--method {stage.method} needs {in_memory}: its search runs the whole model; "
                             f"streaming plans with {', '.join(STREAMED_METHODS)}")
    if stage.compensation is not None:
        raise StreamingError(f"--compensate needs {in_memory}: its fit runs the pruned model on calibration text")
    if job.evaluation.zeroshot is not None or job.evaluation.speed is not None:
        raise StreamingError(f"lm-eval tasks and speed in --eval need {in_memory}; streaming evaluates ppl only")
    if job.evaluation.divergence is not None:
        raise StreamingError(f"kl/top1 in --eval need {in_memory}; streaming evaluates ppl only")
    return stage


def streamed_plan(sm: StreamedModel, calibration: Calibration, stage: DepthStage, run: RunContext, *,
                  max_memory: int | None = None, scratch: Path | None = None, report: Report | None = None) -> Plan:
    """The plan ``make_plan`` would make for a shortgpt, angular or sleb stage, one layer at a time."""
    options = stage.options if stage.options is not None else build_options(stage.method)
    stage.options = options
    stage.check()
    L = sm.num_layers
    if stage.method in ("sleb", "slm", "laco"):
        plan = _streamed_search(sm, calibration, stage, run, max_memory, scratch, report)
        if stage.target is not None and stage.target.given:
            plan.params.setdefault("target", stage.target.to_dict())
        plan.calibration = calibration.to_dict()
        return plan
    if stage.method == "shortgpt":
        n = require("shortgpt", stage.target).n_remove(L)
    else:
        n = options.block if options.block is not None else require("angular", stage.target).n_remove(L)
        if not 1 <= n < L:
            raise PlanError(f"--block must be between 1 and {L - 1}, got {n}")
    stats = streamed_layer_statistics(sm, calibration, batch_size=run.batch_size, progress=run.progress,
                                      max_memory=max_memory, scratch=scratch, report=report)
    plan = plan_shortgpt(stats, n, metric=options.metric) if stage.method == "shortgpt" else plan_angular(stats, n)
    if stage.target is not None and stage.target.given:
        plan.params.setdefault("target", stage.target.to_dict())
    if not plan.calibration:
        plan.calibration = calibration.to_dict()
    return plan


def _streamed_search(sm: StreamedModel, calibration: Calibration, stage: DepthStage, run: RunContext,
                     max_memory: int | None, scratch: Path | None, report: Report | None) -> Plan:
    options = stage.options
    if stage.method == "sleb":
        return streamed_sleb(sm, calibration, require("sleb", stage.target).n_remove(sm.num_layers), options,
                             batch_size=run.batch_size, progress=run.progress, max_memory=max_memory,
                             scratch=scratch, report=report)
    search = slm.searcher(options) if stage.method == "slm" else laco.searcher(options, sm.num_layers)
    with StreamedSimilarityEngine(sm, calibration, batch_size=run.batch_size, progress=run.progress,
                                  max_memory=max_memory, scratch=scratch, report=report) as engine:
        return run_threshold_search(stage.method, search, engine, calibration, stage.target, options, run.progress)


def _evaluate(sm: StreamedModel, evaluation: Evaluation, run: RunContext, max_memory: int | None,
              scratch: Path, report: Report | None) -> EvalResult | None:
    if evaluation.perplexity is None:
        return None
    spec = evaluation.perplexity
    start = time.perf_counter()
    result = EvalResult(perplexity=streamed_perplexity(sm, spec.windows(sm.tokenizer), batch_size=spec.batch_size,
                                                       progress=run.progress, max_memory=max_memory,
                                                       scratch=scratch, report=report))
    result.timings["perplexity"] = time.perf_counter() - start
    return result


def _copy_width_plan(model_dir: str, tmp: Path) -> None:
    """Carry an earlier width plan of the input along, as the in-memory runner does."""
    from ..surgery.width import WIDTH_PLAN_FILE

    if (Path(model_dir) / WIDTH_PLAN_FILE).is_file():
        shutil.copy2(Path(model_dir) / WIDTH_PLAN_FILE, tmp / WIDTH_PLAN_FILE)


def run_streamed_job(
    source: str,
    job: Job,
    *,
    out: str | Path,
    overwrite: bool = False,
    dtype: str | None = None,
    device: str | None = "cpu",
    max_memory: int | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    writers: Sequence[Callable[[Path], Any]] = (),
    report: Report | None = None,
) -> JobResult:
    """Run a depth-only ``job`` on ``source`` one layer at a time and save the pruned checkpoint to ``out``.

    ``dtype`` is the compute dtype for scoring and evaluation (as for the in-memory path) and, when given,
    the saved dtype; without it every tensor is saved in the dtype it is stored in. ``max_memory`` (bytes)
    is the budget the calibration states must fit beside one layer and the embeddings, else they spill to
    disk inside ``out``'s temporary directory. ``writers`` add files to the checkpoint before it is renamed
    into place (e.g. a model card); ``report`` is told how memory was planned.
    """
    stage = check_streamable(job)
    job.check()
    out = check_output_dir(out, inputs=[source], overwrite=overwrite)
    run = RunContext(job.batch_size, job.progress)
    sm = load_streamed(source, dtype=dtype, device=device, progress=job.progress)
    check_output_dir(out, inputs=[sm.path], overwrite=overwrite)  # the resolved input (an alias's directory)
    for option, length in job.window_lengths():
        check_context(sm.config, length, option)
    timings: dict[str, float] = {}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        scratch = tmp / ".depthprune-work"
        scratch.mkdir()
        before = None
        if job.evaluate_before and not job.evaluation.empty:
            start = time.perf_counter()
            before = _evaluate(sm, job.evaluation, run, max_memory, scratch, report)
            timings["evaluate_before"] = time.perf_counter() - start

        start = time.perf_counter()
        calibration = job.calibration.windows(sm.tokenizer)
        plan = streamed_plan(sm, calibration, stage, run, max_memory=max_memory, scratch=scratch, report=report)
        plan.model = source
        record = {"stage": "depth", "method": stage.method, "summary": plan.summary(),
                  "options": stage.options.to_dict() if stage.options else {},
                  "target": stage.target.to_dict() if stage.target else None, "streamed": True}
        record["seconds"] = timings["depth"] = time.perf_counter() - start

        start = time.perf_counter()
        saved = write_pruned_checkpoint(sm, plan, tmp, dtype=resolve_dtype(dtype, "cpu") if dtype else None,
                                        max_shard_size=max_shard_size, progress=job.progress)
        timings["surgery"] = time.perf_counter() - start

        after = None
        if not job.evaluation.empty:
            start = time.perf_counter()
            pruned = load_streamed(str(tmp), dtype=dtype, device=device, progress=job.progress)
            after = _evaluate(pruned, job.evaluation, run, max_memory, scratch, report)
            timings["evaluate_after"] = time.perf_counter() - start

        settings = {"calibration": asdict(job.calibration), "evaluation": job.evaluation.to_dict(),
                    "batch_size": job.batch_size,
                    "streaming": {"device": sm.device, "compute_dtype": str(sm.dtype).split(".")[1],
                                  "saved_dtype": saved.dtype, "max_memory": max_memory, "files": saved.files}}
        result = JobResult(source, [record], plan, before, after,
                           {"before": sm.num_layers, "after": saved.num_layers},
                           {"before": count_parameters(sm.model), "after": saved.parameters}, settings, timings,
                           out)
        write_json(tmp / PLAN_FILE, plan.to_dict())
        _copy_width_plan(sm.path, tmp)
        write_run_report(tmp, result.to_dict(), plan)
        for writer in writers:
            writer(tmp)
        shutil.rmtree(scratch, ignore_errors=True)
    return result
