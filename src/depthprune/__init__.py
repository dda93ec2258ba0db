"""depthprune: make LLMs shallower (ShortGPT, angular, SLM, LaCo), heal them, and measure what was lost.

The data flow, one function per step::

    model, tok = load_model("smollm2-135m")
    cal = calibration_windows(tok)                     # 10 x 128 tokens, seed 1234
    stats = score_layers(model, cal)                   # BI + angular, one decoder pass
    plan = plan_shortgpt(stats, n_remove=7)            # a JSON-able Plan
    apply_plan(model, plan)                            # surgery, in place
    save(model, tok, "out/", plan)                     # atomic, plain transformers checkpoint
    perplexity(model, tok, "wikitext2")
"""

__version__ = "0.1.0"

from .analysis.stats import LayerStats, layer_statistics as score_layers
from .data.calibration import Calibration, sample_windows as calibration_windows, sentences
from .evaluate.perplexity import perplexity
from .heal import HealConfig, heal
from .io import save
from .methods.angular import plan_angular
from .methods.shortgpt import plan_shortgpt
from .models.load import load_model
from .plan import Merge, Plan, layers_to_remove
from .surgery import apply_plan
from .surgery.width import WidthPlan, apply_width_plan, width_plan

__all__ = [
    "Calibration",
    "HealConfig",
    "WidthPlan",
    "apply_width_plan",
    "heal",
    "width_plan",
    "LayerStats",
    "Merge",
    "Plan",
    "__version__",
    "apply_plan",
    "calibration_windows",
    "layers_to_remove",
    "load_model",
    "perplexity",
    "plan_angular",
    "plan_shortgpt",
    "save",
    "score_layers",
    "sentences",
]
