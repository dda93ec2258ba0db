"""The compensation fits, registered by name as methods are: each fit module says what it is and what it needs.

Every fit starts from the least-squares maps (:mod:`.linear`); a fit then declares, on its :class:`Fit`, what it
adds: a refinement of each map on its own (``refine``: ``cosine``) or training through the layers above the gaps
after all maps are in place (``train``: ``kl``, ``layers``), which needs gradients, so the whole model in memory,
and the dense model's outputs as the teacher (``trains``). Code that treats fits differently asks the registry,
never a fit's name; ``depthprune fits`` lists them with the settings each reads. A fit with settings of its
own registers their dataclass (``options``: a :class:`~depthprune.fit_settings.FitOptions`, held by
:class:`~depthprune.fit_settings.Compensation` as the field named after the fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ..fit_settings import FITS, SHARED_SETTINGS, Compensation, FitOptions, declared_settings, get_fit, options_field

if TYPE_CHECKING:
    from ..backend import Backend, Walker
    from ..plan import Plan
    from .interfaces import Interface

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
    config: Compensation
    first_target: int
    progress: bool


Refine = Callable[[torch.Tensor, list, Compensation], torch.Tensor]
Train = Callable[[Training], tuple[Changes, str, dict[str, Any]]]
"""Returns the changes per position, and the key and value of the fit's record."""


@dataclass(frozen=True)
class Fit:
    """A registered fit. ``options``: the dataclass of its own settings, beyond the shared ones (``tokens``,
    ``ridge``, ``seed``), None if it has none; ``refine(t, sample, config)``: a map refined on a sample of (M, Y,
    H) rows after its least-squares solution; ``train``: training after every map is in place;
    ``fit_tokens(config, seq_len)``: calibration tokens it draws (default ``config.tokens``);
    ``train_cost(config)``: training steps x windows, for ``auto``'s progress estimate; ``size(config, backend,
    plan, seq_len, room)``: the settings it fixes from the model and the plan before its windows are drawn (``room()``:
    the windows the text holds for fitting), and a record of why; ``data_parallel``: its training splits each
    batch across the processes of a launch (``torchrun``), the same steps as one process."""

    name: str
    summary: str
    options: type[FitOptions] | None = None
    refine: Refine | None = None
    train: Train | None = None
    fit_tokens: Callable[[Compensation, int], int] | None = None
    train_cost: Callable[[Compensation], float] | None = None
    size: Callable[..., tuple[Compensation, dict[str, Any]]] | None = None
    reference: str = ""
    data_parallel: bool = False

    @property
    def settings(self) -> tuple[str, ...]:
        """Its own settings, as a plan records them (``layers_steps``)."""
        return self.options.flat_names() if self.options is not None else ()

    @property
    def trains(self) -> bool:
        """It trains through the layers above the gaps: the model must be in memory, the teacher cached."""
        return self.train is not None

    def tokens(self, config: Compensation, seq_len: int) -> int:
        return config.tokens if self.fit_tokens is None else self.fit_tokens(config, seq_len)


def register_fit(fit: Fit) -> Fit:
    """Add ``fit`` to :data:`~depthprune.fit_settings.FITS`; its ``options`` must be the settings
    :class:`~depthprune.fit_settings.Compensation` records under its name, or a plan could not hold them."""
    if fit.name in FITS:
        raise ValueError(f"compensation fit {fit.name!r} is registered twice")
    if fit.options is not None and options_field(fit.options) != fit.name:
        raise ValueError(f"compensation fit {fit.name!r}: Compensation holds {fit.options.__name__} as "
                         f"{options_field(fit.options)!r}, not under the fit's name")
    FITS[fit.name] = fit
    return fit


def trained_fits() -> tuple[str, ...]:
    """Names of the fits that need the model in memory."""
    return tuple(name for name, fit in FITS.items() if fit.trains)


def describe_fits() -> str:
    """Every registered fit, what it does and the settings it reads with their defaults (and the command-line
    flag of those a command offers)."""
    defaults = Compensation().to_dict()
    flags = {info.name: info.flag for info in declared_settings()}
    lines = []
    for fit in FITS.values():
        needs = "; trains through the layers above each gap: the model in memory" if fit.trains else ""
        needs += "; data-parallel in a launch of several processes" if fit.data_parallel else ""
        lines.append(f"{fit.name}: {fit.summary}" + (f" ({fit.reference})" if fit.reference else "") + needs)
        for setting in (*SHARED_SETTINGS, *fit.settings):
            flag = f" ({flags[setting]})" if setting in flags else ""
            value = defaults[setting]
            lines.append(f"    {setting}{flag}: {'sized to the weights it trains' if value is None else value}")
    return "\n".join(lines)
