"""Angular-distance block removal (Gromov et al., arXiv 2403.17887).

For a block size n, ``d(l, n) = arccos(cos(h_l[T], h_{l+n}[T])) / pi`` on the
last token T, averaged over samples. Remove the contiguous block
``l*..l*+n-1`` with ``l* = argmin_l d(l, n)``: the span whose input and
output are closest in direction.
"""

from __future__ import annotations

from ..analysis.stats import LayerStats
from ..plan import Plan


def plan_angular(stats: LayerStats, block: int, *, model: str | None = None) -> Plan:
    """Plan removing the ``block`` consecutive layers with the smallest angular distance."""
    distances = stats.angular_distance(block)
    start = min(range(len(distances)), key=lambda l: (distances[l], l))
    return Plan(
        method="angular",
        num_layers=stats.num_layers,
        remove=list(range(start, start + block)),
        params={"block": block, "start": start},
        scores={f"angular_d(l,{block})": distances, "angular": stats.angular_distance(1)},
        calibration=stats.calibration,
        model=model,
    )
