"""The ``cosine`` fit: the least-squares map, then refined with Adam on the mean per-token
``1 - cos(Y + M T, H)`` over a subsample of the fit tokens (ReplaceMe's cosine variant, arXiv 2505.02819)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..fit_settings import Compensation, CosineSettings
from .registry import Fit, register_fit


def refine_cosine(t: torch.Tensor, sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  config: Compensation) -> torch.Tensor | None:
    """T refined by ``cosine.steps`` Adam steps on the sample; None with no steps (the linear solution stands)."""
    options = config.cosine
    if options.steps <= 0:
        return None
    m = torch.cat([s[0] for s in sample]).float()
    y = torch.cat([s[1] for s in sample]).float()
    h = torch.cat([s[2] for s in sample]).float()
    param = nn.Parameter(t.float().clone())
    optim = torch.optim.Adam([param], lr=options.lr)
    with torch.enable_grad():
        for _ in range(options.steps):
            optim.zero_grad()
            loss = (1 - F.cosine_similarity(y + m @ param, h, dim=-1)).mean()
            loss.backward()
            optim.step()
    return param.detach().double()


COSINE = register_fit(Fit("cosine", "linear, then each map refined on per-token cosine",
                          options=CosineSettings, refine=refine_cosine,
                          reference="ReplaceMe's cosine variant, arXiv 2505.02819"))
