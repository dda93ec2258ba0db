"""ShortGPT (Men et al., arXiv 2403.03853): remove the k layers with the lowest Block Influence.

    BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t])

A layer whose output is nearly its input (BI ~ 0) does little; all k layers
are chosen at once from one scoring pass (one-shot, as in the paper).
"""

from __future__ import annotations

from ..analysis.stats import LayerStats
from ..plan import Plan


def plan_shortgpt(stats: LayerStats, n_remove: int, *, metric: str = "bi", model: str | None = None) -> Plan:
    """Plan removing the ``n_remove`` lowest-scoring layers (ties broken by lower index)."""
    scores = stats.scores(metric)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return Plan(
        method="shortgpt",
        num_layers=stats.num_layers,
        remove=order[:n_remove],
        params={"metric": metric, "n_remove": n_remove},
        scores={metric: scores},
        calibration=stats.calibration,
        model=model,
    )
