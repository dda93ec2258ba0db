"""The least-squares fit of one interface map, from normal equations accumulated batch by batch.

For the kept layer at an interface, with M its MLP output, Y the rest of its output and H the original
model's state after the last layer the gap stands for, solve ``min_T ||Y + M T - H||^2`` in float64 with a
ridge pulling T towards the identity (``ridge`` x trace(M^T M) / d): memory O(d^2), not O(tokens x d).
A fit that refines the solution (``cosine``, :mod:`.cosine`) is handed a subsample of the (M, Y, H) rows.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch
from torch import nn

from ..backend import Walker
from ..models.arch import ArchSpec
from ..fit_settings import Compensation
from .fold import output_module
from .interfaces import Interface
from .registry import FITS, Fit, register_fit


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    d = a.shape[0]
    lam = ridge * float(torch.trace(a)) / d
    eye = torch.eye(d, dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, b + lam * eye)


def _residual(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: float) -> float:
    """||M T - (H - Y)||^2 / ||H - Y||^2 from the accumulated normal equations."""
    return float((torch.trace(t.T @ a @ t) - 2 * torch.trace(t.T @ b) + c) / c)


def fit_interface(walker: Walker, key: Hashable, module: nn.Module, interface: Interface, target: Hashable,
                  config: Compensation, spec: ArchSpec) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fit T for one interface: ``module`` is the kept layer, run on a copy of stack ``key``'s states (the stack
    as compensated so far, entering the layer); ``target`` is the store key of the original model's states the
    layer's output should match."""
    a = b = None
    c, tokens = 0.0, 0
    sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    generator = torch.Generator().manual_seed(config.seed)
    refine = FITS[config.fit].refine
    budget = config.cosine.refine_tokens if refine is not None else 0
    seen: dict[str, torch.Tensor] = {}

    def accumulate(index: int, out: torch.Tensor) -> None:
        nonlocal a, b, c, tokens, budget
        mask = walker.batches[index][1]
        keep = mask.bool()
        m = seen["m"].reshape(mask.shape + (-1,))[keep].double().cpu()
        y = out[keep].double().cpu() - m
        h = walker.store.get((target, index)).to(keep.device)[keep].double().cpu()
        goal = h - y
        a = m.T @ m if a is None else a + m.T @ m
        b = m.T @ goal if b is None else b + m.T @ goal
        c += float((goal * goal).sum())
        tokens += m.shape[0]
        if budget > 0:
            take = torch.randperm(m.shape[0], generator=generator)[:budget]
            sample.append((m[take], y[take], h[take]))
            budget -= len(take)

    walker.copy(key, "probe")
    hook = output_module(module, spec).register_forward_hook(lambda mod, args, out: seen.__setitem__("m", out))
    try:
        walker.step("probe", module, accumulate)
    finally:
        hook.remove()
    t = _solve(a, b, config.ridge)
    record = {"layer": interface.layer, "position": interface.position, "target": interface.target,
              "tokens": tokens, "fit": config.fit,
              "residual_before": _residual(torch.eye(len(a), dtype=a.dtype), a, b, c),
              "residual_linear": _residual(t, a, b, c)}
    refined = refine(t, sample, config) if refine is not None else None
    if refined is not None:
        t = refined
        record["refine_tokens"] = sum(len(s[0]) for s in sample)
    record["residual_after"] = _residual(t, a, b, c)
    return t, record


LINEAR = register_fit(Fit("linear", "ridge least squares",
                          reference="ReplaceMe, arXiv 2505.02819; LinearPatch, arXiv 2505.24680"))
