"""Angular-distance block removal (Gromov et al., arXiv 2403.17887).

For a block size n, ``d(l, n) = arccos(cos(h_l[T], h_{l+n}[T])) / pi`` on the
last token T, averaged over samples. Remove the contiguous block
``l*..l*+n-1`` with ``l* = argmin_l d(l, n)``: the span whose input and
output are closest in direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis.stats import LayerStats, layer_statistics
from ..backend import Backend
from ..data.calibration import Calibration
from ..plan import Plan, PlanError
from .registry import MethodOptions, RunContext, option, register
from .target import Target, given, require


@dataclass
class AngularOptions(MethodOptions):
    block: int | None = option(None, "size n of the contiguous block to remove (instead of a depth target)")

    def validate(self) -> None:
        if self.block is not None:
            check_block(self.block)

    def check_target(self, method: str, target: Target | None) -> None:
        if self.block is None:
            require(method, target)
        elif given(target):
            raise PlanError("--method angular takes either --block or a depth target, not both")

    def check_depth(self, num_layers: int) -> None:
        if self.block is not None:
            check_block(self.block, num_layers)


def check_block(block: int, num_layers: int | None = None) -> None:
    """A block size, the one place it is checked: at least one layer, and (once the depth is known) fewer than
    the model has, so a layer is left on each side of the distance d(l, n)."""
    if block < 1:
        raise PlanError(f"--block must be at least 1, got {block}")
    if num_layers is not None and block >= num_layers:
        raise PlanError(f"--block must be between 1 and {num_layers - 1}, got {block}")


def plan_angular(stats: LayerStats, block: int) -> Plan:
    """Plan removing the ``block`` consecutive layers with the smallest angular distance."""
    distances = stats.angular_distance(block)
    start = min(range(len(distances)), key=lambda l: (distances[l], l))
    return Plan(
        method="angular",
        num_layers=stats.num_layers,
        remove=list(range(start, start + block)),
        params={"block": block, "start": start},
        scores={f"angular_d(l,{block})": distances, "angular": stats.angular_distance(1)},
    )


@register("angular", "remove the contiguous block with the smallest angular distance", AngularOptions,
          reference="Gromov et al., arXiv 2403.17887")
def plan(backend: Backend, calibration: Calibration, target: Target | None, options: AngularOptions,
         run: RunContext) -> Plan:
    L = backend.num_layers
    block = options.block if options.block is not None else require("angular", target).n_remove(L)
    check_block(block, L)
    stats = layer_statistics(backend, calibration, batch_size=run.batch_size, progress=run.progress)
    return plan_angular(stats, block)
