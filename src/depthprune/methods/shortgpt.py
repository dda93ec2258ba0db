"""ShortGPT (Men et al., arXiv 2403.03853): remove the k layers with the lowest Block Influence.

    BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t])

A layer whose output is nearly its input (BI ~ 0) does little; all k layers
are chosen at once from one scoring pass (one-shot, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis.stats import METRICS, LayerStats, layer_statistics
from ..backend import Backend
from ..data.calibration import Calibration
from ..plan import Plan
from .registry import MethodOptions, RunContext, option, register
from .target import Target, require


@dataclass
class ShortGPTOptions(MethodOptions):
    metric: str = option("bi", "per-layer score: bi (Block Influence) or angular (d(l, 1) of each layer)",
                         choices=METRICS)


def plan_shortgpt(stats: LayerStats, n_remove: int, *, metric: str = "bi") -> Plan:
    """Plan removing the ``n_remove`` lowest-scoring layers (ties broken by lower index)."""
    scores = stats.scores(metric)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return Plan(
        method="shortgpt",
        num_layers=stats.num_layers,
        remove=order[:n_remove],
        params={"metric": metric, "n_remove": n_remove},
        scores={metric: scores},
    )


@register("shortgpt", "remove the k layers with the lowest Block Influence", ShortGPTOptions,
          reference="ShortGPT, arXiv 2403.03853")
def plan(backend: Backend, calibration: Calibration, target: Target | None, options: ShortGPTOptions,
         run: RunContext) -> Plan:
    n = require("shortgpt", target).n_remove(backend.num_layers)
    stats = layer_statistics(backend, calibration, batch_size=run.batch_size, progress=run.progress)
    return plan_shortgpt(stats, n, metric=options.metric)
