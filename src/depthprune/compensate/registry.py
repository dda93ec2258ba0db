"""The compensation fits, registered by name as methods are: each fit module says what it is and what it needs.

Every fit starts from the least-squares maps (:mod:`.linear`); a fit then declares, on its :class:`Fit`, what it
adds: a refinement of each map on its own (``refine``: ``cosine``) or training through the layers above the gaps
after all maps are in place (``train``: ``kl``, ``layers``), which needs gradients, so the whole model in memory,
and the dense model's outputs as the teacher (``trains``). Code that treats fits differently asks the registry,
never a fit's name; ``depthprune fits`` lists them with the settings each reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from ..backend import Backend, Walker
    from ..plan import Plan
    from .interfaces import Interface

Settings = Any
"""A :class:`~depthprune.compensate.config.Compensation` (named loosely here: the settings module reads this
registry to check them)."""

Changes = dict[int, dict[str, torch.Tensor]]
"""Pruned-model position -> parameter name inside that layer -> new value."""


@dataclass
class Training:
    """What a training fit is given once every linear map is in place: the plan's stack with the maps folded
    in, its interfaces, the walker holding the original model's states on the fit windows (``start``: the first
    position the fit may change), the teacher's final states, and the settings."""

    backend: "Backend"
    plan: "Plan"
    stack: list[nn.Module]
    found: Sequence["Interface"]
    walker: "Walker"
    start: int
    teacher: list[torch.Tensor]
    config: Settings
    first_target: int
    progress: bool


Refine = Callable[[torch.Tensor, list, Settings], torch.Tensor]
Train = Callable[[Training], tuple[Changes, str, dict[str, Any]]]
"""Returns the changes per position, and the key and value of the fit's record."""


@dataclass(frozen=True)
class Fit:
    """A registered fit. ``settings``: the :class:`~depthprune.compensate.config.Compensation` fields it reads
    beyond the shared ones (``tokens``, ``ridge``, ``seed``); ``refine(t, sample, config)``: a map refined on a
    sample of (M, Y, H) rows after its least-squares solution; ``train``: training after every map is in place;
    ``fit_tokens(config, seq_len)``: calibration tokens it draws (default ``config.tokens``); ``upgrade(fields)``:
    what a plan recorded before a setting existed means for this fit; ``train_cost(config)``: training steps x
    windows, for ``auto``'s progress estimate."""

    name: str
    summary: str
    settings: tuple[str, ...] = ()
    refine: Refine | None = None
    train: Train | None = None
    fit_tokens: Callable[[Settings, int], int] | None = None
    upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    train_cost: Callable[[Settings], float] | None = None
    reference: str = ""

    @property
    def trains(self) -> bool:
        """It trains through the layers above the gaps: the model must be in memory, the teacher cached."""
        return self.train is not None

    def tokens(self, config: Settings, seq_len: int) -> int:
        return config.tokens if self.fit_tokens is None else self.fit_tokens(config, seq_len)


SHARED_SETTINGS = ("tokens", "ridge", "seed")
"""The settings every fit reads: its calibration tokens, the least-squares ridge and the sampling seed."""

FITS: dict[str, Fit] = {}
"""Registered fits by name, in the order ``--compensate`` lists them."""


def register_fit(fit: Fit) -> Fit:
    if fit.name in FITS:
        raise ValueError(f"compensation fit {fit.name!r} is registered twice")
    FITS[fit.name] = fit
    return fit


def get_fit(name: str) -> Fit:
    if name not in FITS:
        raise InputError(f"unknown compensation {name!r}: use one of {', '.join(FITS)}")
    return FITS[name]


def trained_fits() -> tuple[str, ...]:
    """Names of the fits that need the model in memory."""
    return tuple(name for name, fit in FITS.items() if fit.trains)
