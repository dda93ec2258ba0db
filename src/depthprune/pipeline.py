"""The whole job as one readable recipe: load -> calibrate -> plan -> surgery -> save -> evaluate.

The CLI commands and ``bench`` call these functions; nothing here parses options.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from .data.calibration import Calibration, sample_windows, sentences_from_file
from .evaluate.perplexity import PerplexityResult, perplexity
from .io import check_output_dir, save
from .methods import Target, make_plan
from .models.arch import num_layers
from .models.load import LoadedModel
from .plan import Plan
from .report import write_run_report
from .surgery import apply_plan


@dataclass
class CalibrationSpec:
    """Where calibration comes from: sampled token windows, or a file of sentences (LaCo)."""

    source: str = "default"
    num_windows: int = 10
    seq_len: int = 128
    seed: int = 1234
    sentences_file: Path | None = None

    def windows(self, tokenizer: Any) -> Calibration:
        if self.sentences_file is not None:
            return sentences_from_file(tokenizer, self.sentences_file, max_len=self.seq_len)
        return sample_windows(tokenizer, self.source, num_windows=self.num_windows,
                              seq_len=self.seq_len, seed=self.seed)


@dataclass
class PerplexitySpec:
    dataset: str = "default-heldout"
    seq_len: int = 128
    max_windows: int | None = 40
    batch_size: int = 8

    def run(self, model: nn.Module, tokenizer: Any, progress: bool = True) -> PerplexityResult:
        return perplexity(model, tokenizer, self.dataset, seq_len=self.seq_len,
                          batch_size=self.batch_size, max_windows=self.max_windows, progress=progress)


@dataclass
class ZeroShotSpec:
    """lm-eval tasks and how to run them (see :func:`depthprune.evaluate.zeroshot.evaluate_zeroshot`)."""

    tasks: list[str]
    limit: int | float | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    task_dir: str | None = None
    piqa_dir: str | None = None
    seed: int = 1234

    def check(self) -> None:
        """Validate before any model work; pin folders (and ``$DEPTHPRUNE_PIQA_DIR``) to absolute paths
        so the settings recorded, and compared on resume, say which data was used."""
        from .evaluate.zeroshot import PIQA_LOCAL_TASK, check_tasks, resolve_piqa_dir

        check_tasks(self.tasks, task_dir=self.task_dir, piqa_dir=self.piqa_dir)
        if self.task_dir is not None:
            self.task_dir = str(Path(self.task_dir).resolve())
        piqa = resolve_piqa_dir(self.piqa_dir) if PIQA_LOCAL_TASK in self.tasks else None
        self.piqa_dir = str(piqa.resolve()) if piqa is not None else None

    def run(self, model: Any, tokenizer: Any, progress: bool = False):
        from .evaluate.zeroshot import evaluate_zeroshot

        return evaluate_zeroshot(model, tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size,
                                 num_fewshot=self.num_fewshot, task_dir=self.task_dir, piqa_dir=self.piqa_dir,
                                 seed=self.seed, progress=progress)


@dataclass
class WidthSpec:
    """Width stage after depth pruning (the SLM paper's depth + width combination)."""

    ratio_mlp: float = 0.2
    ratio_heads: float = 0.0
    scorer: str = "taylor"


@dataclass
class HealSpec:
    """LoRA healing appended after surgery; ``work_dir`` holds the Trainer's checkpoints."""

    data: str
    config: Any = None
    work_dir: Path | None = None


@dataclass
class PruneResult:
    plan: Plan
    out: Path | None
    layers_before: int
    layers_after: int
    ppl_before: PerplexityResult | None = None
    ppl_after: PerplexityResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tasks_before: dict[str, float] | None = None
    tasks_after: dict[str, float] | None = None

    def metrics(self, when: str) -> dict[str, float | None]:
        """Perplexity and task scores measured ``before`` or ``after`` pruning, by name."""
        ppl = self.ppl_before if when == "before" else self.ppl_after
        tasks = self.tasks_before if when == "before" else self.tasks_after
        out: dict[str, float | None] = {"perplexity": ppl.perplexity} if ppl else {}
        out.update(tasks or {})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_before": self.layers_before,
            "layers_after": self.layers_after,
            "plan": self.plan.summary(),
            "out": str(self.out) if self.out else None,
            "perplexity_before": self.ppl_before.to_dict() if self.ppl_before else None,
            "perplexity_after": self.ppl_after.to_dict() if self.ppl_after else None,
            "tasks_before": self.tasks_before,
            "tasks_after": self.tasks_after,
            "timings_s": self.timings,
        }


def prune(
    loaded: LoadedModel,
    method: str,
    target: Target | None = None,
    *,
    calibration: CalibrationSpec | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    ppl: PerplexitySpec | None = None,
    zeroshot: ZeroShotSpec | None = None,
    width: WidthSpec | None = None,
    heal: HealSpec | None = None,
    progress: bool = True,
    **method_options: Any,
) -> PruneResult:
    """Plan with ``method``, apply the plan to ``loaded.model`` in place, optionally prune width and
    heal, and save to ``out``. Every stage is recorded in ``plan.stages``."""
    timings: dict[str, float] = {}
    if out is not None:
        check_output_dir(out, inputs=[loaded.path], overwrite=overwrite)
    model, tok = loaded.model, loaded.tokenizer
    calibration = calibration or CalibrationSpec()
    windows = calibration.windows(tok)
    before = num_layers(model)

    t = time.perf_counter()
    ppl_before, tasks_before = _evaluate(model, tok, ppl, zeroshot, progress)
    timings["evaluate_before"] = time.perf_counter() - t

    t = time.perf_counter()
    plan = make_plan(method, model, windows, target, progress=progress, **method_options)
    plan.model = loaded.source
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    apply_plan(model, plan)
    timings["surgery"] = time.perf_counter() - t
    extra: dict[str, Any] = {}

    if width is not None:
        t = time.perf_counter()
        from .surgery.width import WIDTH_PLAN_FILE, apply_width_plan, width_plan

        needs_data = width.scorer != "magnitude"
        wplan = width_plan(model, windows if needs_data else None, width.ratio_mlp, width.ratio_heads,
                           width.scorer, progress=progress)
        apply_width_plan(model, wplan)
        plan.stages.append({"stage": "width", "summary": wplan.summary(), "file": WIDTH_PLAN_FILE})
        extra[WIDTH_PLAN_FILE] = wplan.to_dict()
        timings["width"] = time.perf_counter() - t

    if heal is not None:
        t = time.perf_counter()
        from .heal import heal as run_heal

        healed = run_heal(model, tok, heal.data, heal.config, heal.work_dir or heal_work_dir(out))
        plan.stages.append({"stage": "heal", "data": healed.data, "steps": healed.global_step,
                            "best_eval_loss": healed.best_eval_loss, "config": healed.config})
        timings["heal"] = time.perf_counter() - t

    t = time.perf_counter()
    ppl_after, tasks_after = _evaluate(model, tok, ppl, zeroshot, progress)
    timings["evaluate_after"] = time.perf_counter() - t

    result = PruneResult(plan, None, before, num_layers(model), ppl_before, ppl_after, timings,
                         tasks_before, tasks_after)
    if out is not None:
        t = time.perf_counter()
        result.out = Path(out).expanduser().resolve()
        settings = {"calibration": plan.calibration, "perplexity": asdict(ppl) if ppl else None,
                    "zeroshot": asdict(zeroshot) if zeroshot else None}
        report = partial(write_run_report, plan=plan, before=result.metrics("before"),
                         after=result.metrics("after"), model=loaded.source, settings=settings,
                         timings=timings, extra=result.to_dict())
        result.out = save(model, tok, out, plan, inputs=[loaded.path], overwrite=overwrite,
                          extra_json=extra, writers=[report])
        timings["save"] = time.perf_counter() - t
        if heal is not None and heal.work_dir is None:
            shutil.rmtree(heal_work_dir(out), ignore_errors=True)
    return result


def heal_work_dir(out: str | Path | None) -> Path:
    """Trainer checkpoints live beside the output (never inside it: the save is atomic)."""
    if out is None:
        return Path("depthprune-heal-work").resolve()
    out = Path(out).expanduser().resolve()
    return out.parent / f"{out.name}.heal-work"


def _evaluate(model: nn.Module, tok: Any, ppl: PerplexitySpec | None, zeroshot: ZeroShotSpec | None,
              progress: bool) -> tuple[PerplexityResult | None, dict[str, float] | None]:
    ppl_result = ppl.run(model, tok, progress) if ppl is not None else None
    tasks = None
    if zeroshot is not None:
        tasks = {name: score.value for name, score in zeroshot.run(model, tok, progress).scores.items()}
    return ppl_result, tasks
