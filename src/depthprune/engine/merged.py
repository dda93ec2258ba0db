"""Candidate layers for the engines that cost no model copy.

``MergedLayer`` runs the first member's module with the merged projection
weights substituted through ``torch.func.functional_call``; the merged tensors
exist only while a candidate is evaluated (``release()`` frees them), and the
original layers are never written to. ``PatchedLayer`` does the same with a
few parameters replaced (a compensation folded into a down projection).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..models.arch import ArchSpec
from ..operators import merge_params
from ..plan import Plan


def layer_params(module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(module, (MergedLayer, PatchedLayer)):
        return module.params()
    return dict(module.named_parameters())


def base_module(module: nn.Module) -> nn.Module:
    """The real decoder layer a candidate layer runs (with its own parameters substituted)."""
    return module.base if isinstance(module, (MergedLayer, PatchedLayer)) else module


class MergedLayer(nn.Module):
    def __init__(self, members: list[nn.Module], operator: str, spec: ArchSpec):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.operator = operator
        self.spec = spec
        self._params: dict[str, torch.Tensor] | None = None

    @property
    def base(self) -> nn.Module:
        return base_module(self.members[0])

    def params(self) -> dict[str, torch.Tensor]:
        """Parameters of the merged layer (projections merged, the rest from the first member)."""
        if self._params is None:
            first = layer_params(self.members[0])
            merged = merge_params([layer_params(m) for m in self.members], self.operator, self.spec)
            self._params = {**first, **merged}
        return self._params

    def release(self) -> None:
        self._params = None
        for m in self.members:
            if isinstance(m, MergedLayer):
                m.release()

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.params(), args, kwargs)


class PatchedLayer(nn.Module):
    """A layer (original, merged or patched) with some parameters replaced, e.g. a compensated down projection."""

    def __init__(self, inner: nn.Module, overrides: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = inner
        self.overrides = overrides

    @property
    def base(self) -> nn.Module:
        return base_module(self.inner)

    def params(self) -> dict[str, torch.Tensor]:
        return {**layer_params(self.inner), **self.overrides}

    def release(self) -> None:
        if isinstance(self.inner, (MergedLayer, PatchedLayer)):
            self.inner.release()

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.params(), args, kwargs)


def plan_stack(plan: "Plan", layers: list[nn.Module], spec: ArchSpec) -> list[nn.Module]:
    """A plan's pruned model as candidate modules over the original ``layers``: kept layers as they are, merged
    windows as :class:`MergedLayer` (nested merges take the earlier merge as a member), no weight written."""
    standing: dict[int, nn.Module] = dict(enumerate(layers))
    for index, merge in enumerate(plan.merges):
        members = plan.merge_members(index)
        standing[merge.low] = MergedLayer([standing[i] for i in members], merge.operator, spec)
    return [standing[i] for i in plan.kept]
