"""The job runner: one recipe for every command that writes a checkpoint.

    load -> evaluate before -> stages (depth, width, heal, ...) -> evaluate after -> report -> atomic save

``prune`` runs ``[DepthStage, WidthStage?, HealStage?]``, ``width`` runs
``[WidthStage]``, ``heal`` runs ``[HealStage]`` and every ``bench`` row runs
``[DepthStage]`` without saving. A stage changes the model in place and
returns a record (what it did, with its numbers) for the report and the plan.

The model is a :class:`~depthprune.backend.Backend`: in memory, or streamed
from disk one layer at a time (a model larger than memory). The job is the
same; a stage or an evaluation that needs the whole model in memory (width
pruning, healing, the ``kl`` compensation fit, lm-eval, speed) says so in
:meth:`Job.memory_needs`, and a streamed job refuses it before any work.

The output is written into a temporary sibling of ``out`` that is renamed into
place at the end; scratch space a stage needs (the Trainer's checkpoints while
healing, a streamed model's spilled states and its pruned checkpoint before
the save) lives inside it and is removed before the rename, so an interrupted
job leaves nothing half-written at ``out``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from ._version import __version__
from .analysis.importance import SCORERS, WidthError
from .backend import Backend, InMemoryBackend, NeedsMemoryError
from .compensate import Compensation, get_fit, trained_fits
from .data.calibration import Calibration, CalibrationSpec
from .distributed import check_launch, from_main, main_first, processes, working
from .engine.merged import plan_stack
from .errors import InputError
from .evaluate.perplexity import first_target_of
from .evaluate.suite import EvalResult, Evaluation
from .io import check_output_dir, kind_of, prepare_dir, write_beside
from .methods import MethodOptions, RunContext, Target, build_options, check_request, make_plan
from .models.arch import count_parameters
from .models.load import LoadedModel, check_context, config_num_layers, load_model, quiet_transformers
from .models.mutate import temporary_layer_stack
from .plan import PLAN_FILE, Plan, PlanError
from .report import compare_metrics, write_run_report
from .run_record import RUN_FILE, RunRecord, RunRecordError
from .saving import atomic_checkpoint
from .surgery.apply import apply, fit_window_count, sized_plan
from .surgery.width import WIDTH_PLAN_FILE, apply_width_plan, check_width_request, config_sizes, width_plan

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What stages share: the model (a backend; a stage that changes the model may replace it), calibration
    windows (built on first use), scratch space, outputs."""

    backend: Backend
    calibration_spec: CalibrationSpec
    run: RunContext
    scratch: Path
    plan: Plan | None = None
    evaluation: Evaluation | None = None
    files: dict[str, Any] = field(default_factory=dict)
    writers: list[Callable[[Path], None]] = field(default_factory=list)
    _calibration: Calibration | None = None

    @property
    def model(self) -> nn.Module:
        return self.backend.model

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def calibration(self) -> Calibration:
        if self._calibration is None:
            self._calibration = self.calibration_spec.windows(self.tokenizer)
        return self._calibration

    def heldout(self) -> Calibration:
        """Calibration windows no fit ever sees, for ranking candidate plans."""
        return self.calibration_spec.heldout(self.tokenizer)

    def fit_windows(self, tokens: int, seed: int) -> Calibration:
        """About ``tokens`` tokens of calibration text (never the held-out windows), for fitting compensation."""
        count = fit_window_count(tokens, self.calibration_spec.seq_len)
        return self.calibration_spec.fit_windows(self.tokenizer, count, seed)

    def fit_batches(self, tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`fit_windows` as batches on the model's device."""
        return self.backend.to_device(self.fit_windows(tokens, seed).batches(self.run.batch_size))

    def fit_first_target(self, tokens: int, seed: int) -> int:
        """Where the fit windows' predicted tokens start (after BOS when the tokenizer adds one)."""
        return first_target_of(self.fit_windows(tokens, seed))


class Stage(Protocol):
    name: str
    uses_calibration: bool

    def check(self, config: dict[str, Any] | None = None) -> None:
        """Everything that can be checked before a model is loaded (against its ``config.json`` when given)."""

    def memory_needs(self) -> list[str]:
        """What this stage asks that needs the whole model in memory (options as the user typed them)."""

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Change ``ctx.model`` in place; return the record of what was done."""


@dataclass
class DepthStage:
    """Plan with a registered method and apply the plan (remove / merge layers)."""

    method: str
    target: Target | None = None
    options: MethodOptions | None = None
    compensation: Compensation | None = None
    plan: Plan | None = None
    measure_uncompensated: bool = False
    name: str = field(default="depth", init=False)
    uses_calibration: bool = field(default=True, init=False)

    def check(self, config: dict[str, Any] | None = None) -> None:
        if self.options is None:
            self.options = build_options(self.method)
        if self.plan is None:
            check_request(self.method, self.target, self.options,
                          config_num_layers(config) if config is not None else None)
        elif config is not None:  # re-applying a plan: its depth is the decision, no target needed
            self.plan.check_model_depth(config_num_layers(config))
        if self.compensation is not None:
            if self.method == "auto":
                raise PlanError("--method auto decides compensation itself (its --fits option); drop --compensate")
            self.compensation.validate()
        launch = processes()
        if launch.several and self.data_parallel:
            batch = (self.compensation or self.plan and self.plan.compensation or Compensation()).layers.batch
            if launch.world > batch:
                raise InputError(f"the layers fit trains {batch} windows a step, split across the processes: "
                                 f"launch at most {batch} processes (this launch has {launch.world})")

    @property
    def data_parallel(self) -> bool:
        """Whether this stage trains data-parallel in a launch of several processes: it fits a compensation that
        does (``--compensate layers``, auto's ``--recover layers``). The main process plans, every process
        trains its share of each batch."""
        fits = [c.fit for c in (self.compensation, self.plan.compensation if self.plan else None) if c]
        if getattr(self.options, "recover", "none") != "none":
            fits.append(self.options.recover)
        return bool(fits) and all(get_fit(fit).data_parallel for fit in fits)

    def memory_needs(self) -> list[str]:
        needs = []
        if self.compensation is not None and self.compensation.fit in trained_fits():
            needs.append(f"--compensate {self.compensation.fit}")
        needs += [f"--fits {fit}" for fit in getattr(self.options, "fit_list", lambda: [])() if fit in trained_fits()]
        if getattr(self.options, "recover", "none") != "none":
            needs.append(f"--recover {self.options.recover}")
        return needs

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Plan (or re-apply ``self.plan``, a plan this method made for this model before), fit the plan's
        compensation if it has one, then surgery. The plan stays the method's decision; what this stage used
        and measured goes to its record (and from there to the run record)."""
        self.check()
        notes: dict[str, Any] = {}
        launch = processes()
        if self.plan is not None:
            plan = Plan.from_dict(self.plan.to_dict())
        elif launch.main:
            plan = make_plan(self.method, ctx.backend, ctx.calibration, self.target, options=self.options,
                             batch_size=ctx.run.batch_size, progress=ctx.run.progress, data=ctx, notes=notes)
        if launch.several and self.plan is None:  # one search; every process then fits the same plan
            plan = Plan.from_dict(from_main(plan.to_dict() if launch.main else None))
        if self.compensation is not None:
            plan = replace(plan, compensation=self.compensation)
        plan, sizing = sized_plan(ctx.backend, plan, ctx.calibration_spec)
        if "warning" in sizing:
            log.warning(sizing["warning"])
        record: dict[str, Any] = {
            "stage": self.name, "method": self.method, "source": ctx.backend.source, "summary": plan.summary(),
            "options": self.options.to_dict() if self.options else {},
            "target": self.target.to_dict() if self.target else None,
            "calibration": ctx.calibration.to_dict() if self.plan is None else None,
            "calibration_spec": asdict(ctx.calibration_spec), "batch_size": ctx.run.batch_size, **notes}
        if plan.compensation and self.measure_uncompensated and launch.main and ctx.evaluation is not None \
                and not ctx.evaluation.empty:
            record["uncompensated"] = _measure_stack(ctx, plan)
        applied = apply(ctx.backend, plan, ctx.calibration_spec, batch_size=ctx.run.batch_size, scratch=ctx.scratch,
                        progress=ctx.run.progress)
        if plan.compensation:
            record["compensation"] = applied.compensation
        if sizing:
            record["compensation_sizing"] = sizing
        ctx.backend = applied.backend
        ctx.plan = plan
        if ctx.backend.kind == "streamed":
            record["streamed"] = True
        return record


def _measure_stack(ctx: StageContext, plan: Plan) -> dict[str, float]:
    """The job's evaluation of ``plan`` without its compensation (the model as pruned, before any fit), run on
    the plan's stack of the original layers: nothing is copied or written."""
    ctx.backend.require_memory("measuring the plan before compensation")
    stack = plan_stack(plan, list(ctx.backend.layers), ctx.backend.spec)
    lists = {k: [v[i] for i in plan.kept] for k, v in ctx.backend.per_layer_config().items()}
    with temporary_layer_stack(ctx.model, stack, lists):
        view = InMemoryBackend(ctx.model, ctx.tokenizer, ctx.backend.source, ctx.backend.path)
        return ctx.evaluation.run(view, ctx.tokenizer, ctx.run.progress).values()


@dataclass
class WidthStage:
    """Structured width pruning: the same number of MLP channels / key-value groups removed in every layer."""

    ratio_mlp: float = 0.2
    ratio_heads: float = 0.0
    scorer: str = "taylor"
    flags: tuple[str, str] = ("--ratio-mlp", "--ratio-heads")
    name: str = field(default="width", init=False)

    @property
    def uses_calibration(self) -> bool:
        return self.scorer != "magnitude"

    def check(self, config: dict[str, Any] | None = None) -> None:
        if self.scorer not in SCORERS:
            raise WidthError(f"unknown width scorer {self.scorer!r}: use one of {', '.join(SCORERS)}")
        for what, value in (("MLP", self.ratio_mlp), ("heads", self.ratio_heads)):
            if not 0.0 <= value < 1.0:
                raise WidthError(f"the width ratio for {what} must be in [0, 1), got {value}")
        if self.ratio_mlp == 0 and self.ratio_heads == 0:
            raise WidthError("nothing to prune: give an MLP and/or a heads ratio above 0")
        if config is not None:
            check_width_request(config_sizes(config), self.ratio_mlp, self.ratio_heads, self.flags)

    def memory_needs(self) -> list[str]:
        return ["--then-width (width pruning)"]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        wplan = width_plan(ctx.model, ctx.calibration if self.uses_calibration else None, self.ratio_mlp,
                           self.ratio_heads, self.scorer, batch_size=ctx.run.batch_size,
                           progress=ctx.run.progress)
        wplan.model = ctx.backend.source
        apply_width_plan(ctx.model, wplan)
        ctx.files[WIDTH_PLAN_FILE] = wplan.to_dict()
        return {"stage": self.name, "summary": wplan.summary(), "file": WIDTH_PLAN_FILE,
                "sizes_before": wplan.sizes_before, "sizes_after": wplan.sizes_after}


@dataclass
class HealStage:
    """Healing (LoRA merged into the weights, or the last layers trained; optionally distilled).

    Trainer checkpoints live in ``work_dir`` or the job's scratch space. With ``config.distill`` the teacher is
    loaded from ``teacher`` (a model source), or, when None, from the job's input: in ``prune`` that is the
    dense model the depth stage started from, read again from disk.
    """

    data: str
    config: Any = None
    work_dir: Path | None = None
    resume: bool = False
    save_adapter: bool = False
    keep_checkpoints: bool = False
    teacher: str | None = None
    option_prefix: str = "--"
    name: str = field(default="heal", init=False)
    uses_calibration: bool = field(default=False, init=False)
    data_parallel: bool = field(default=True, init=False)

    def check(self, config: dict[str, Any] | None = None) -> None:
        from .heal import QLORA_NEEDS_CUDA, HealConfig, HealError, check_heal_data, data_paths
        from .heal.data import TEXT_SUFFIXES

        flag = lambda name: self.option_prefix + name.replace("_", "-")  # noqa: E731
        self.config = (self.config or HealConfig()).validate(flag)
        if self.config.qlora and not torch.cuda.is_available():
            raise HealError(QLORA_NEEDS_CUDA)
        check_launch(batch_size=self.config.batch_size, eval_batch_size=self.config.eval_batch_size, stream=None)
        check_heal_data(self.data)
        if self.resume and self.work_dir is None:
            raise HealError("--resume continues the Trainer checkpoints in --work-dir: pass the --work-dir "
                            "of the interrupted run")
        if self.work_dir is not None:
            self.work_dir = check_output_dir(self.work_dir, kind="work", option="--work-dir")
            if self.resume and not self.work_dir.is_dir():
                raise HealError(f"--resume: {self.work_dir} does not exist, so there is nothing to continue")
        paths = data_paths(self.data)
        if paths and all(p.suffix in TEXT_SUFFIXES for p in paths):
            self.config.check_budget(self.config.cutoff_len)  # text blocks are exactly --cutoff-len tokens
        if self.config.teacher_cache_dir is not None:
            self.config.teacher_cache_dir = str(check_output_dir(self.config.teacher_cache_dir, kind="teacher-cache",
                                                                 option="--teacher-cache"))

    def memory_needs(self) -> list[str]:
        return ["--heal (healing)"]

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from .heal import Teacher, heal

        work = prepare_dir(self.work_dir, "work") if self.work_dir is not None else ctx.scratch / "heal-work"
        teacher = None
        if self.config.distill:
            params = next(ctx.model.parameters())
            source = self.teacher or ctx.backend.path
            teacher = Teacher(source, lambda: load_model(source, dtype=params.dtype, device=str(params.device),
                                                         progress=ctx.run.progress).model)
        result = heal(ctx.model, ctx.tokenizer, self.data, self.config, work, resume=self.resume,
                      save_adapter=self.save_adapter, teacher=teacher)
        ctx.backend = InMemoryBackend(result.model, ctx.backend.tokenizer, ctx.backend.source, ctx.backend.path)
        if result.adapter_dir:
            adapter = Path(result.adapter_dir)
            ctx.writers.append(lambda tmp: shutil.copytree(adapter, tmp / "adapter"))
        if self.work_dir is not None and not self.keep_checkpoints and kind_of(work) == "work":
            ctx.writers.append(lambda tmp: shutil.rmtree(work, ignore_errors=True))
        summary = result.to_dict()
        if summary.get("best_checkpoint") and self.work_dir is None:
            summary["best_checkpoint"] = Path(summary["best_checkpoint"]).name
        trained = "LoRA" if self.config.last_layers() is None else self.config.train_layers
        loss = f"distillation from {self.teacher or 'the input model'}" if self.config.distill else "LM loss"
        speed = f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""
        if result.processes > 1 and result.tokens_per_s:
            speed += (f" on {result.processes} processes ({result.engine}; "
                      f"{result.tokens_per_s_per_process:,.0f} each)")
        return {"stage": self.name, "summary": f"heal: {result.global_step} steps ({result.tokens_seen:,} tokens"
                f"{speed}) of {trained} on {result.data.get('kind')} data with {loss}, best validation loss "
                f"{result.best_eval_loss}", "data": result.data, "steps": result.global_step,
                "tokens": result.tokens_seen, "max_tokens": self.config.max_tokens,
                "tokens_per_s": result.tokens_per_s, "teacher": result.teacher,
                "best_eval_loss": result.best_eval_loss, "config": result.config, "result": summary}


@dataclass
class Job:
    """Stages plus what every stage shares: calibration, evaluation and how to run."""

    stages: list[Any]
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: Evaluation = field(default_factory=Evaluation)
    evaluate_before: bool = True
    batch_size: int = 8
    progress: bool = True

    def check(self, config: dict[str, Any] | None = None) -> "Job":
        """Check every input that can be checked without a model (call before loading one); with the model's
        ``config.json`` (a model on disk) also depth targets, layer ranges and widths against it."""
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        launch = processes()
        alone = [stage.name for stage in self.stages if not getattr(stage, "data_parallel", False)]
        if launch.several and alone:
            raise InputError(f"this launch has {launch.world} processes, but {' and '.join(alone)} runs in one: "
                             "only training runs data-parallel (healing, --compensate layers, auto's --recover "
                             "layers). Run this command as one process (no accelerate launch / torchrun), or "
                             "launch `depthprune heal` on its output")
        if any(stage.uses_calibration for stage in self.stages):
            self.calibration.check()
        for stage in self.stages:
            stage.check(config)
        self.evaluation.check()
        return self

    def memory_needs(self) -> list[str]:
        """Everything the job asks that needs the whole model in memory (as the user typed it)."""
        needs = [need for stage in self.stages for need in stage.memory_needs()]
        if self.evaluation.zeroshot is not None:
            needs.append("lm-eval tasks in --eval")
        if self.evaluation.speed is not None:
            needs.append("speed in --eval")
        return needs

    def check_backend(self, kind: str) -> None:
        """Refuse, before any work, what a backend of ``kind`` cannot do."""
        needs = self.memory_needs()
        if kind == "streamed" and needs:
            raise NeedsMemoryError(f"{', '.join(needs)} need{'s' if len(needs) == 1 else ''} the model in memory "
                                   "(pass --no-stream, or use a machine where the model fits); streaming runs "
                                   "scoring, every pruning method, linear/cosine compensation, surgery and ppl")

    def window_lengths(self) -> list[tuple[str, int]]:
        """(option, tokens) of every sequence the job will run, to check against the model's context."""
        lengths = []
        if any(stage.uses_calibration for stage in self.stages):
            lengths.append(("--seq-len", self.calibration.seq_len))
        lengths += [("--cutoff-len", stage.config.cutoff_len) for stage in self.stages if isinstance(stage, HealStage)
                    and stage.config is not None]
        if self.evaluation.perplexity is not None:
            lengths.append(("--seq-len", self.evaluation.perplexity.seq_len))
        if self.evaluation.speed is not None:
            speed = self.evaluation.speed
            lengths.append(("--prompt-len + --gen-len", speed.prompt_len + speed.gen_len + 1))
        return lengths


@dataclass
class JobResult:
    source: str
    stages: list[dict[str, Any]]
    plan: Plan | None
    before: EvalResult | None
    after: EvalResult | None
    layers: dict[str, int]
    parameters: dict[str, int]
    settings: dict[str, Any]
    timings: dict[str, float]
    out: Path | None = None
    run: RunRecord | None = None

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Every measured value before and after, with its change and direction."""
        before = self.before.values() if self.before else {}
        after = self.after.values() if self.after else {}
        directions = {**(self.before.higher_is_better() if self.before else {}),
                      **(self.after.higher_is_better() if self.after else {})}
        return compare_metrics(before, after, directions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written_by": f"depthprune {__version__}",
            "model": self.source,
            "out": str(self.out) if self.out else None,
            "layers": self.layers,
            "parameters": self.parameters,
            "stages": self.stages,
            "plan": self.plan.to_dict() if self.plan else None,
            "run": self.run.to_dict() if self.run else None,
            "metrics": self.metrics(),
            "before": self.before.values() if self.before else {},
            "after": self.after.values() if self.after else {},
            "evaluation": {"before": self.before.to_dict() if self.before else None,
                           "after": self.after.to_dict() if self.after else None},
            "settings": self.settings,
            "timings_s": self.timings,
        }


def _carried_plan(model_dir: str) -> Plan | None:
    """The depth plan saved beside the input model (provenance of an earlier job), if readable."""
    path = Path(model_dir) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return Plan.load(path)
    except PlanError as err:
        log.warning("not carrying the input's plan into the output: %s", err)
        return None


def _carried_record(model_dir: str | None) -> RunRecord:
    """The run record of the input checkpoint (how it was made), or an empty one for a model depthprune did
    not make."""
    try:
        return (RunRecord.of_checkpoint(model_dir) if model_dir else None) or RunRecord()
    except RunRecordError as err:
        log.warning("not carrying the input's run record into the output: %s", err)
        return RunRecord()


def _copy_provenance(model_dir: str, names: list[str]) -> Callable[[Path], None]:
    """A checkpoint writer copying provenance files of the input (an earlier width plan) it lacks."""

    def write(tmp: Path) -> None:
        for name in names:
            src = Path(model_dir) / name
            if src.is_file() and not (tmp / name).exists():
                shutil.copy2(src, tmp / name)

    return write


def run_job(model: "Backend | LoadedModel", job: Job, *, out: str | Path | None = None, overwrite: bool = False,
            writers: Sequence[Callable[[Path], Any]] = ()) -> JobResult:
    """Run ``job`` on ``model`` (a :class:`~depthprune.backend.Backend`, e.g. a streamed model, or a loaded
    model, changed in place); save to ``out`` atomically when given.

    ``writers`` add files to the checkpoint after the report, before it is renamed into place (a model card).
    """
    backend = InMemoryBackend.of(model)
    job.check()
    job.check_backend(backend.kind)
    for option, length in job.window_lengths():
        check_context(backend.config, length, option)
    if out is not None:
        out = check_output_dir(out, inputs=[p for p in (backend.path,) if p], overwrite=overwrite)
    launch = processes()
    timings: dict[str, float] = {}
    layers = {"before": backend.num_layers}
    parameters = {"before": count_parameters(backend.model)}
    source, source_path = backend.source, backend.path
    with ExitStack() as stack:
        stack.enter_context(working())
        tmp, scratch = None, None
        if not launch.main:
            pass  # the main process alone writes; the others work in its scratch space
        elif out is not None:
            tmp = stack.enter_context(atomic_checkpoint(out, overwrite=overwrite))
            scratch = tmp / ".depthprune-work"
            scratch.mkdir()
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="depthprune-work-")))
        if launch.several:
            scratch = Path(from_main(str(scratch)))
        if getattr(backend, "scratch", False) is None:
            backend.scratch = scratch  # a streamed model's states spill inside the job's scratch space
        ctx = StageContext(backend, job.calibration, RunContext(job.batch_size, job.progress), scratch,
                           evaluation=job.evaluation)
        if job.calibration.needs_model and any(stage.uses_calibration for stage in job.stages):
            backend.require_memory(f"--calib {job.calibration.source} (text sampled from the model)")
            with main_first():
                job.calibration.sample_from(backend.model, backend.tokenizer, job.progress)

        evaluates = launch.main and not job.evaluation.empty
        if evaluates:
            job.evaluation.prepare(source, source_path, first_is_input=job.evaluate_before or not job.stages,
                                   open_reference=backend.open_like, progress=job.progress)
        before = None
        if job.evaluate_before and evaluates:
            start = time.perf_counter()
            before = job.evaluation.run(backend, backend.tokenizer, job.progress)
            timings["evaluate_before"] = time.perf_counter() - start
        records = []
        for stage in job.stages:
            start = time.perf_counter()
            record = stage.run(ctx)
            record["seconds"] = timings[stage.name] = time.perf_counter() - start
            records.append(record)
        after = None
        if evaluates:
            start = time.perf_counter()
            after = job.evaluation.run(ctx.backend, ctx.tokenizer, job.progress)
            timings["evaluate_after"] = time.perf_counter() - start
        layers["after"] = ctx.backend.num_layers
        parameters["after"] = count_parameters(ctx.model)

        plan = ctx.plan
        saved_plan = plan if plan is not None else (_carried_plan(source_path) if out is not None else None)
        run = _carried_record(source_path).extended(source, records)
        settings = {"calibration": asdict(job.calibration) if ctx._calibration is not None else None,
                    "evaluation": job.evaluation.to_dict(), "batch_size": job.batch_size}
        if ctx.backend.kind == "streamed":
            settings["streaming"] = {"device": str(ctx.backend.device),
                                     "compute_dtype": str(ctx.backend.dtype).split(".")[1],
                                     "max_memory": ctx.backend.max_memory}
        result = JobResult(source, records, plan, before, after, layers, parameters, settings, timings, out, run)
        if tmp is not None:
            start = time.perf_counter()
            writers = [*ctx.writers, _copy_provenance(source_path, [WIDTH_PLAN_FILE]),
                       lambda directory: write_run_report(directory, result.to_dict(), saved_plan), *writers]
            with quiet_transformers(not job.progress):
                saved = ctx.backend.save(tmp, progress=job.progress)
                if "streaming" in settings:
                    settings["streaming"]["files"] = saved.get("files")
                write_beside(tmp, saved_plan, extra_json={**ctx.files, RUN_FILE: run.to_dict()}, writers=writers)
            shutil.rmtree(scratch, ignore_errors=True)
            timings["save"] = time.perf_counter() - start
    return result
