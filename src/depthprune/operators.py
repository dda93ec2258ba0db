"""Merge operators: what a plan's merge operator name means for the projections of a merged window.

Only the *projection* parameters (the matrices and biases named in the
architecture's ``projections``) are merged; every other parameter (the norms)
comes from layer ``low``. With ``theta_k`` a projection of layer ``low + k``,
``m = high - low``:

``rdsc``       LaCo/SLM paper formula ("Reserving Differences while Seeking Common"):
               ``theta* = theta_0 + sum_{k=1..m} (theta_k - theta_0)``
``reference``  what the released LaCo and SLM code computes: an in-place loop
               ``base += theta_k - base`` for k = 1..m, which telescopes to
               ``theta_m`` (layer high's projections under layer low's norms),
               reproduced step by step so rounding matches bit for bit
``average``    ``theta* = mean_{k=0..m} theta_k``
``drop``       ``theta* = theta_0``: keep layer low, drop the others

The names are part of a plan (:class:`~depthprune.plan.Merge`), the math is what surgery and the merged
candidate layers run, so both read them here, beneath either.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import PlanError
from .models.arch import ArchSpec

Operator = Callable[[list[torch.Tensor]], torch.Tensor]


def _rdsc(ts: list[torch.Tensor]) -> torch.Tensor:
    base = ts[0]
    out = base.clone()
    for t in ts[1:]:
        out += t - base
    return out


def _reference(ts: list[torch.Tensor]) -> torch.Tensor:
    base = ts[0].clone()
    for t in ts[1:]:
        base += t - base
    return base


def _average(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(ts).float().mean(dim=0).to(ts[0].dtype)


def _drop(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].clone()


OPERATORS: dict[str, Operator] = {
    "rdsc": _rdsc,
    "reference": _reference,
    "average": _average,
    "drop": _drop,
}


def check_operator(name: str) -> None:
    if name not in OPERATORS:
        raise PlanError(f"unknown merge operator {name!r}: use one of {', '.join(OPERATORS)}")


def is_projection(param_name: str, spec: ArchSpec) -> bool:
    return any(param_name.startswith(path + ".") for path in spec.projections.values())


def merge_params(
    param_dicts: list[dict[str, torch.Tensor]], operator: str, spec: ArchSpec
) -> dict[str, torch.Tensor]:
    """The merged value of every projection parameter, from each layer's named parameters."""
    check_operator(operator)
    fn = OPERATORS[operator]
    return {
        name: fn([p[name].detach() for p in param_dicts])
        for name in param_dicts[0]
        if is_projection(name, spec)
    }
