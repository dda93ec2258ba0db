"""depthprune: make LLMs shallower (ShortGPT, angular, SLM, LaCo), heal them, and measure what was lost.

The data flow, one function per step::

    model, tok = load_model("smollm2-135m")
    cal = calibration_windows(tok)                     # 10 x 128 tokens, seed 1234
    plan = make_plan("shortgpt", model, cal, Target(ratio=0.25))   # a JSON-able Plan
    apply_plan(model, plan)                            # surgery, in place
    save(model, tok, "out/", plan)                     # atomic, plain transformers checkpoint
    perplexity(model, tok, "default-heldout")

or the whole job at once: ``run_job(load_model(...), Job([DepthStage("shortgpt", Target(ratio=0.25))]), out=...)``.
"""

from ._version import __version__
from .analysis.stats import LayerStats, layer_statistics as score_layers
from .data.calibration import Calibration, CalibrationSpec, sample_windows as calibration_windows, sentences
from .errors import DepthpruneError
from .evaluate.perplexity import perplexity
from .evaluate.suite import Evaluation, PerplexitySpec, SpeedSpec, ZeroShotSpec
from .heal import HealConfig, heal
from .saving import save
from .job import DepthStage, HealStage, Job, JobResult, WidthStage, run_job
from .methods import METHODS, Target, build_options, describe_methods, layers_to_remove, make_plan
from .methods.angular import plan_angular
from .methods.shortgpt import plan_shortgpt
from .models.load import load_model
from .plan import Merge, Plan
from .surgery import apply_plan
from .surgery.width import WidthPlan, apply_width_plan, width_plan

__all__ = [
    "METHODS",
    "Calibration",
    "CalibrationSpec",
    "DepthStage",
    "DepthpruneError",
    "Evaluation",
    "HealConfig",
    "HealStage",
    "Job",
    "JobResult",
    "LayerStats",
    "Merge",
    "PerplexitySpec",
    "Plan",
    "SpeedSpec",
    "Target",
    "WidthPlan",
    "WidthStage",
    "ZeroShotSpec",
    "__version__",
    "apply_plan",
    "apply_width_plan",
    "build_options",
    "calibration_windows",
    "describe_methods",
    "heal",
    "layers_to_remove",
    "load_model",
    "make_plan",
    "perplexity",
    "plan_angular",
    "plan_shortgpt",
    "run_job",
    "save",
    "score_layers",
    "sentences",
    "width_plan",
]
