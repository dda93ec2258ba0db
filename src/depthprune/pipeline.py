"""The whole job as one readable recipe: load -> calibrate -> plan -> surgery -> save -> evaluate.

The CLI commands and ``bench`` call these functions; nothing here parses options.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
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
from .report import plot_layer_scores

REPORT_FILE = "report.json"


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers_before": self.layers_before,
            "layers_after": self.layers_after,
            "plan": self.plan.summary(),
            "out": str(self.out) if self.out else None,
            "perplexity_before": self.ppl_before.to_dict() if self.ppl_before else None,
            "perplexity_after": self.ppl_after.to_dict() if self.ppl_after else None,
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

    ppl_before = None
    if ppl is not None:
        t = time.perf_counter()
        ppl_before = ppl.run(model, tok, progress)
        timings["perplexity_before"] = time.perf_counter() - t

    t = time.perf_counter()
    plan = make_plan(method, model, windows, target, progress=progress, **method_options)
    plan.model = loaded.source
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    from .surgery import apply_plan

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

        healed = run_heal(model, tok, heal.data, heal.config, heal.work_dir or _heal_work_dir(out))
        plan.stages.append({"stage": "heal", "data": healed.data, "steps": healed.global_step,
                            "best_eval_loss": healed.best_eval_loss, "config": healed.config})
        timings["heal"] = time.perf_counter() - t

    ppl_after = None
    if ppl is not None:
        t = time.perf_counter()
        ppl_after = ppl.run(model, tok, progress)
        timings["perplexity_after"] = time.perf_counter() - t

    result = PruneResult(plan, None, before, num_layers(model), ppl_before, ppl_after, timings)
    if out is not None:
        t = time.perf_counter()
        result.out = Path(out).expanduser().resolve()
        result.out = save(model, tok, out, plan, inputs=[loaded.path], overwrite=overwrite,
                          extra_json={REPORT_FILE: result.to_dict(), **extra},
                          writers=[lambda tmp: plot_plan_scores(plan, tmp / "layer_scores.png")])
        timings["save"] = time.perf_counter() - t
        if heal is not None and heal.work_dir is None:
            shutil.rmtree(_heal_work_dir(out), ignore_errors=True)
    return result


def _heal_work_dir(out: str | Path | None) -> Path:
    """Trainer checkpoints live beside the output (never inside it: the save is atomic)."""
    if out is None:
        return Path("depthprune-heal-work").resolve()
    out = Path(out).expanduser().resolve()
    return out.parent / f"{out.name}.heal-work"


def plot_plan_scores(plan: Plan, path: Path) -> Path | None:
    """Bar chart of the plan's first per-layer score, dropped layers in red."""
    for metric, scores in plan.scores.items():
        if len(scores) == plan.num_layers:
            return plot_layer_scores(scores, path, metric=metric, highlight=plan.dropped, title=plan.summary())
    return None
