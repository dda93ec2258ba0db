"""Interface compensation: a linear map fitted where layers were removed, folded into existing weights.

ReplaceMe (arXiv 2505.02819) and LinearPatch (arXiv 2505.24680): after a run
of layers is removed (or merged), the layer kept just before the gap now hands
the next layer a hidden state that differs from what the original model had
there. Fit a d x d map T on that kept layer's MLP output M so that

    Y + M T  ~  H_t        (Y = the kept layer's output minus M, H_t = the original model's
                            hidden state after the last layer the gap stands for)

and fold it into weights the layer already has, so the checkpoint keeps its
architecture, parameter count and plain-transformers loading:

* ``full`` fold (the MLP output reaches the residual stream directly): the
  down projection becomes ``W <- T^T W``, ``b <- T^T b`` (GPT-2's Conv1D stores
  W transposed: ``W <- W T``);
* ``qd`` fold (Gemma 2/3: the MLP output passes through an RMSNorm first, so no
  weight can carry a full T): RMSNorm does not see a rotation of its input, so a
  map of the form ``diag(g) T = Q D`` (Q orthogonal, D diagonal, g the norm's
  gain) folds exactly: Q into the down projection, D as the norm's new gain.
  The fold uses the orthogonal x diagonal matrix nearest to ``diag(g) T``.

Gaps are fitted bottom-up, each on the model as pruned and compensated so far,
on any backend (a streamed model included, for ``linear`` and ``cosine``): the
fit never writes the model; it returns the changed parameters of each kept
layer (``Fitted.overrides``), which surgery writes into the pruned model (in
memory) or into the pruned checkpoint (streamed), and the candidate stack with
those changes in place (``Fitted.stack``), which ``auto`` ranks.

Modules: :mod:`.registry` (the fits by name, what each reads and needs), :mod:`depthprune.fit_settings`
(the settings a plan records: the shared ones and one dataclass per fit),
:mod:`.interfaces` (where the gaps are), :mod:`.fold` (folding T into weights), one module per fit:
:mod:`.linear` (least squares), :mod:`.cosine`, :mod:`.endtoend` (``kl``), :mod:`.layers`.

Fits (``fit``):

``linear``  least squares in float64, from normal equations accumulated batch
            by batch (memory O(d^2), not O(tokens x d)), with a ridge pulling
            T towards the identity (``ridge`` x trace(M^T M) / d) so a fit on
            a few thousand tokens cannot wander far from "no change";
``cosine``  ``linear``, then Adam steps on the mean per-token
            ``1 - cos(Y + M T, H_t)`` over a subsample of the tokens
            (ReplaceMe's variant);
``kl``      ``linear`` for every gap, then all maps trained together (Adam,
            model weights frozen) on KL(original || pruned) next-token
            distributions over calibration windows: it optimises what the
            model outputs rather than the state at each gap. Costs a few
            hundred forward/backward passes.

A gap before the first kept layer has no layer to carry a map: skipped and
recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..backend import Backend, InMemoryBackend, Stack, Walker
from ..fit_settings import (DEFAULT_TOKENS, LAYERS_AFTER, LAYERS_STEPS, Compensation, CosineSettings,
                            FitOptions, KLSettings, LayersSettings)
from ..engine.merged import PatchedLayer, layer_params, plan_stack
from ..models.forward import Batch
from ..plan import Plan
from . import linear, cosine, endtoend, layers  # noqa: F401  isort: skip  (each registers its fit, in this order)
from .fold import fold_in_place, folded, output_module
from .interfaces import Interface, check_supported, fold_kind, interfaces
from .linear import fit_interface
from .registry import FITS, SHARED_SETTINGS, Fit, Training, get_fit, trained_fits

__all__ = [
    "DEFAULT_TOKENS",
    "LAYERS_AFTER",
    "LAYERS_STEPS",
    "FITS",
    "SHARED_SETTINGS",
    "Compensation",
    "CosineSettings",
    "Fit",
    "FitOptions",
    "FitSession",
    "Fitted",
    "Interface",
    "check_supported",
    "fit_compensation",
    "fold_in_place",
    "fold_kind",
    "folded",
    "get_fit",
    "interfaces",
    "KLSettings",
    "LayersSettings",
    "output_module",
    "trained_fits",
]


@dataclass
class Fitted:
    """What fitting a plan's compensation produced.

    ``overrides``: pruned-model position -> parameter name inside that layer -> new value (surgery writes
    them); ``stack``: the plan's kept layers as candidate modules with the changes in place (what ``auto``
    scores); ``records``: one per interface (tokens, residuals, fold error) and notes on gaps not fitted.
    """

    overrides: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    stack: list[nn.Module] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


def _patch(stack: list[nn.Module], fitted: Fitted, position: int, changes: dict[str, torch.Tensor]) -> None:
    stack[position] = PatchedLayer(stack[position], changes)
    fitted.overrides[position] = {**fitted.overrides.get(position, {}), **changes}


def unchanged_prefix(plan: Plan) -> int:
    """How many of the pruned model's first layers are the original's first layers, untouched: the state
    entering that position is the original model's."""
    merged = {m.low for m in plan.merges}
    count = 0
    for position, layer in enumerate(plan.kept):
        if layer != position or layer in merged:
            break
        count += 1
    return count


def needed_states(plan: Plan) -> set[int]:
    """Original layer positions whose entering states fitting ``plan`` reads: after every gap's last layer,
    and where the plan's first change begins."""
    found, _ = interfaces(plan)
    return {i.target + 1 for i in found} | {min(unchanged_prefix(plan), found[0].position if found else 0)}


class FitSession:
    """The original model's states on the fit windows, computed in one walk and shared by every plan fitted on
    those windows (``auto`` fits several): each plan then runs only from its first changed layer up.

    ``plans`` are the plans that will be fitted (their needed states are kept). Use as a context manager.
    """

    def __init__(self, model: "nn.Module | Backend", batches: Sequence[Batch], plans: Sequence[Plan], *,
                 teacher: bool = False, first_target: int = 1, progress: bool = False) -> None:
        self.backend = InMemoryBackend.of(model)
        self.first_target = first_target
        positions = set().union(*(needed_states(plan) for plan in plans)) if plans else set()
        # at the peak: the input, the original's output, its kept states, the stack being fitted and a probe
        self.walker = Walker(self.backend, batches, sets=len(positions) + 4)
        try:
            self.walker.run({"original": Stack(list(self.backend.layers))}, keep={"original": positions},
                            progress=progress, desc="original states (fit windows)")
            self.teacher = self.walker.finals("original") if teacher else None
        except BaseException:
            self.walker.close()
            raise

    def close(self) -> None:
        self.walker.close()

    def __enter__(self) -> "FitSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fit_compensation(model: "nn.Module | Backend", plan: Plan, batches: Sequence[Batch], config: Compensation, *,
                     session: FitSession | None = None, first_target: int = 1, progress: bool = False) -> Fitted:
    """Fit every interface of ``plan`` bottom-up on the *unpruned* ``model`` (a model or a backend), each on
    the plan's stack as compensated so far; for ``kl``, then train all maps end to end (in memory only).

    ``session`` (made for these ``batches`` with this plan among its plans) shares the original model's states
    with other fits; without one, a session is made for this plan alone. ``first_target``: where the windows'
    predicted tokens start (after BOS), for the fits trained on next-token distributions.
    """
    backend = InMemoryBackend.of(model)
    spec = backend.spec
    check_supported(spec)
    config.validate()
    fit = get_fit(config.fit)
    if fit.trains:
        backend.require_memory(f"--compensate {config.fit}")
    found, notes = interfaces(plan)
    stack = plan_stack(plan, list(backend.layers), spec)
    fitted = Fitted(stack=stack, records=[{"note": note} for note in notes])
    if not found:
        return fitted
    if session is None:
        with FitSession(backend, batches, [plan], teacher=fit.trains, first_target=first_target,
                        progress=progress) as own:
            return _fit(backend, plan, stack, fitted, found, config, own, progress)
    return _fit(backend, plan, stack, fitted, found, config, session, progress)


def _fit(backend: Backend, plan: Plan, stack: list[nn.Module], fitted: Fitted, found: list[Interface],
         config: Compensation, session: FitSession, progress: bool = False) -> Fitted:
    spec, walker = backend.spec, session.walker
    done = start = min(unchanged_prefix(plan), found[0].position)
    walker.copy(("enter", "original", done), "current")
    for interface in found:
        walker.run({"current": Stack(stack[done:interface.position], start="current")})
        done = interface.position
        t, record = fit_interface(walker, "current", stack[done], interface,
                                  ("enter", "original", interface.target + 1), config, spec)
        with backend.materialized([stack[done]]):
            changes, fold = folded(layer_params(stack[done]), t, spec)
            _release(stack[done])
        _patch(stack, fitted, done, changes)
        fitted.records.append({**record, **fold})
    fit = get_fit(config.fit)
    if fit.train is not None:
        teacher = session.teacher if session.teacher is not None else walker.finals("original")
        trained, key, summary = fit.train(Training(backend, plan, stack, found, walker, start, teacher, config,
                                                   session.first_target, progress))
        for position, changes in trained.items():
            _patch(stack, fitted, position, changes)
        fitted.records.append({key: summary})
    return fitted


def _release(module: nn.Module) -> None:
    release = getattr(module, "release", None)
    if release is not None:
        release()
