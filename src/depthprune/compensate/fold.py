"""Folding a map T on a layer's MLP output into weights the layer already has (so the architecture stays plain).

* ``full`` (the MLP output reaches the residual stream directly): ``W <- T^T W``, ``b <- T^T b`` on the down
  projection (GPT-2's Conv1D stores W transposed: ``W <- W T``);
* ``qd`` (Gemma 2/3: an RMSNorm follows the MLP): the orthogonal x diagonal ``Q D`` nearest to ``diag(g) T``,
  Q into the down projection and D as the norm's new gain (RMSNorm does not see a rotation of its input).
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.merged import base_module
from ..models.arch import ArchSpec, get_path
from .interfaces import fold_kind


def output_module(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    """The module whose output is the MLP's contribution to the residual stream."""
    return get_path(base_module(layer), spec.post_mlp_norm or spec.down_proj)


def _nearest_qd(a: torch.Tensor, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal Q and diagonal D (as a vector) minimising ||A - Q diag(D)||_F, by alternating exact steps:
    for fixed D, Q is the orthogonal Procrustes solution of A diag(D); for fixed Q, D = diag(Q^T A)."""
    d = torch.diagonal(a).clone()
    for _ in range(iterations):
        u, _, vh = torch.linalg.svd(a * d.unsqueeze(0))
        q = u @ vh
        d = torch.diagonal(q.T @ a).clone()
    return q, d


def folded(params: dict[str, torch.Tensor], t: torch.Tensor, spec: ArchSpec) -> tuple[dict[str, torch.Tensor],
                                                                                         dict[str, float]]:
    """A layer's parameters (named as the layer holds them) that change when T is folded in, and what the fold
    lost (``qd``: the relative distance between ``diag(g) T`` and the Q D folded instead; 0 for ``full``)."""
    t = t.double()
    down = {name: params[name].detach() for name in (f"{spec.down_proj}.weight", f"{spec.down_proj}.bias")
            if params.get(name) is not None}
    if spec.post_mlp_norm is None:
        rotate, extra, lost = t, {}, 0.0
    else:
        gain_name = f"{spec.post_mlp_norm}.weight"
        gain = params[gain_name].detach().double().cpu() + spec.norm_gain_offset
        a = gain.unsqueeze(1) * t.cpu()
        rotate, scale = _nearest_qd(a)
        lost = float((a - rotate * scale.unsqueeze(0)).norm() / a.norm())
        extra = {gain_name: (scale - spec.norm_gain_offset).to(params[gain_name].dtype)}
    out = dict(extra)
    for name, value in down.items():
        r = rotate.to(value.device)
        if name.endswith(".bias"):
            new = value.double() @ r
        else:
            new = value.double() @ r if spec.conv1d else r.T @ value.double()
        out[name] = new.to(value.dtype)
    return out, {"fold": fold_kind(spec), "fold_error": lost}


@torch.no_grad()
def fold_in_place(layer: nn.Module, t: torch.Tensor, spec: ArchSpec) -> dict[str, float]:
    """Fold ``t`` into ``layer``'s own weights (a real layer in memory); returns the fold's record."""
    params = dict(layer.named_parameters())
    changes, record = folded(params, t, spec)
    for name, value in changes.items():
        params[name].copy_(value.to(params[name].device))
    return record
