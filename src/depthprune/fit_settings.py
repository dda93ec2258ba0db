"""How interface maps are fitted: the settings a plan records, so re-applying the plan re-fits the same way.

PEFT's config per tuner: the settings every fit reads (its calibration tokens, the ridge, the seed) sit on
:class:`Compensation`, and each fit with settings of its own has one dataclass of them (:class:`CosineSettings`,
:class:`KLSettings`, :class:`LayersSettings`), which checks its fields and knows what a plan written before one
of them existed meant. :class:`Compensation` holds one of each, as the field named after its fit.

A plan stores them flat, each fit's fields under its ``PREFIX`` (``kl_steps``, ``layers_after``), in the order
plans have always had: plans written before the fits had their own dataclasses load and save byte for byte.

This module imports no backend and no plan, so :class:`~depthprune.plan.Plan` types its ``compensation`` with
:class:`Compensation`; for the same reason the registry of fits (:data:`FITS`) is held here, and the fits fill it
from :mod:`depthprune.compensate.registry`.
"""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, ClassVar

from .checks import flag_of, require_finite_fields
from .errors import InputError
from .flags import OptionInfo, declared_options, option

DEFAULT_TOKENS = 8192
"""Fit tokens by default: with the ridge, 8k tokens fit SmolLM2's maps as well as 64k or 128k (see the docs)."""
LAYERS_STEPS = 100
"""Training steps of the ``layers`` fit at least when it sizes them itself (no ``--compensate-steps``), and where
nothing sized them (``auto``'s candidate fits, cost estimates)."""
LAYERS_WEIGHTS_PER_TOKEN = 144
"""With no ``--compensate-steps`` the ``layers`` fit trains on one new token per this many weights it trains (one
pass, at least :data:`LAYERS_STEPS` steps): a fixed step count under-trains a large model's layers and overfits a
small text. SmolLM2-135M's two trained layers (7.1M weights) get the 100 steps of 4 x 128 tokens measured in the
docs, a 0.5B model's (Qwen2.5, 30M) about 400, a 7B model's (400M) about 5,500."""
LAYERS_AFTER = 1
"""Kept layers above each gap the ``layers`` fit trains beside the one before it, by default
(``--compensate-above``)."""
LAYERS_TOKENS = 16384
"""Fit tokens of the ``layers`` fit at least: trained layers overfit 8k tokens (held-out KL 0.675 vs 0.645 at 16k
on SmolLM2, docs/compensation.md)."""
LAYERS_HOLDOUT = 16
"""Fit windows the ``layers`` fit never trains on: it watches their KL to keep its best weights and stop."""
LAYERS_CHECK_EVERY = 10
"""Training steps between two looks at the held-out KL."""
LAYERS_PATIENCE = 3
"""Looks in a row without a better held-out KL before the fit stops (0: never stop early, keep the last weights)."""

FITS: dict[str, Any] = {}
"""Registered fits by name (:class:`~depthprune.compensate.registry.Fit`), in the order ``--compensate`` lists
them; :func:`~depthprune.compensate.registry.register_fit` adds them."""


def get_fit(name: str) -> Any:
    """The registered :class:`~depthprune.compensate.registry.Fit` called ``name``."""
    if name not in FITS:
        raise InputError(f"unknown compensation {name!r}: use one of {', '.join(FITS)}")
    return FITS[name]


@dataclass
class FitOptions:
    """One fit's own settings. ``PREFIX``: what a plan calls its fields (``kl_`` + ``steps``); a field declared
    with :func:`~depthprune.flags.option` is a flag of the commands that fit."""

    PREFIX: ClassVar[str] = ""

    def validate(self) -> None:
        require_finite_fields(self, lambda name: flag_of(self.PREFIX + name))

    def flat(self) -> dict[str, Any]:
        """The fields as a plan records them."""
        return {self.PREFIX + name: value for name, value in asdict(self).items()}

    @classmethod
    def flat_names(cls) -> tuple[str, ...]:
        return tuple(cls.PREFIX + f.name for f in fields(cls))

    @classmethod
    def upgrade(cls, recorded: dict[str, Any]) -> dict[str, Any]:
        """What a plan recorded (flat) for this fit before one of its settings existed means now."""
        return recorded


def _require_counts(*counts: int) -> None:
    """Token, window and batch counts of at least one."""
    if min(counts) < 1:
        raise InputError("compensation token, window and batch counts must be positive")


def _require_training(steps: int, lr: float, *counts: int) -> None:
    """Steps 0 or more, a positive learning rate, and counts of at least one."""
    if steps < 0 or lr <= 0:
        raise InputError("compensation steps must be 0 or more and learning rates positive")
    _require_counts(*counts)


@dataclass
class CosineSettings(FitOptions):
    """``cosine``: Adam ``steps`` at ``lr`` on a subsample of ``refine_tokens`` of the fit tokens."""

    steps: int = 300
    lr: float = 1e-3
    refine_tokens: int = 16384

    def validate(self) -> None:
        super().validate()
        _require_training(self.steps, self.lr, self.refine_tokens)


@dataclass
class KLSettings(FitOptions):
    """``kl``: Adam ``steps`` at ``lr`` on ``windows`` calibration windows, ``batch`` a step."""

    PREFIX: ClassVar[str] = "kl_"
    steps: int = 150
    lr: float = 1e-4
    windows: int = 32
    batch: int = 4

    def validate(self) -> None:
        super().validate()
        _require_training(self.steps, self.lr, self.windows, self.batch)


@dataclass
class LayersSettings(FitOptions):
    """``layers``: Adam ``steps`` (cosine schedule from ``lr``) of ``batch`` windows on at least ``tokens`` fit
    tokens, training the kept layer at every gap and ``after`` above it; ``holdout`` windows watched every
    ``check_every`` steps, stopping after ``patience`` looks without progress; the LM head run ``chunk`` tokens
    at a time; ``one_pass``: no training window seen twice."""

    PREFIX: ClassVar[str] = "layers_"
    steps: int | None = option(None, "training steps (4 windows each). Default: sized to the weights it trains, "
                               f"one new token per {LAYERS_WEIGHTS_PER_TOKEN} of them (at least {LAYERS_STEPS} steps, "
                               "no window seen twice, at most what the text holds); the cost grows linearly (100 "
                               "steps of SmolLM2-135M: about 2.5 minutes on 2 CPU cores).", flag="compensate-steps")
    lr: float = 5e-4
    batch: int = 4
    after: int = option(LAYERS_AFTER, "how many kept layers above each gap train beside the one before it (a "
                        "larger number trains every layer above the gap; on SmolLM2 all of them cost 20% more time "
                        "for a few points of perplexity, the same KL).", flag="compensate-above")
    tokens: int = LAYERS_TOKENS
    holdout: int = LAYERS_HOLDOUT
    chunk: int = 512
    check_every: int = LAYERS_CHECK_EVERY
    patience: int = LAYERS_PATIENCE
    one_pass: bool = True

    def validate(self) -> None:
        super().validate()
        _require_counts(self.tokens, self.batch, self.chunk)
        if min(self.planned_steps, self.holdout, self.after, self.patience) < 0 or self.lr <= 0 \
                or self.check_every < 1:
            raise InputError("--compensate layers: steps, held-out windows and layers after the gap must be 0 or "
                             "more, the learning rate positive")

    @property
    def planned_steps(self) -> int:
        """``steps``, or :data:`LAYERS_STEPS` where nothing sized them (the fit sizes them from the model and plan
        before it draws its windows: :func:`depthprune.compensate.layers.size`)."""
        return LAYERS_STEPS if self.steps is None else self.steps

    @classmethod
    def upgrade(cls, recorded: dict[str, Any]) -> dict[str, Any]:
        """A plan written before ``layers_tokens`` existed fitted on ``tokens``; one written before the fit
        watched its held-out windows trained every step on random windows and kept its last weights: each
        re-fits so."""
        recorded.setdefault("layers_tokens", recorded.get("tokens", DEFAULT_TOKENS))
        if "layers_one_pass" not in recorded:
            recorded.update(layers_one_pass=False, layers_patience=0,
                            layers_holdout=recorded.get("layers_holdout", 8))
        return recorded


def _options_type(f: Field) -> type[FitOptions] | None:
    """The fit settings class a :class:`Compensation` field holds, or None for a shared setting."""
    made = f.default_factory
    return made if isinstance(made, type) and issubclass(made, FitOptions) else None


def _parts(cls: type) -> dict[str, type[FitOptions]]:
    """The :class:`Compensation` fields holding a fit's settings: field (fit) name -> settings class."""
    return {f.name: made for f in fields(cls) if (made := _options_type(f)) is not None}


@dataclass
class Compensation:
    """How to fit the interface maps: ``fit`` (a registered fit's name), the settings every fit reads, and each
    fit's own settings as the field named after it. A plan records it (:meth:`to_dict`), so re-applying the plan
    re-fits the same way.

    The settings a command offers are declared with :func:`~depthprune.flags.option` (their flag, default and
    help, here once); :func:`declared_settings` lists them under the names a plan records.
    """

    fit: str = "linear"
    tokens: int = option(DEFAULT_TOKENS, "Calibration tokens for the compensation fit.", flag="compensate-tokens")
    ridge: float = option(1e-3, "Compensation ridge towards the identity (x trace/d).")
    cosine: CosineSettings = field(default_factory=CosineSettings)
    kl: KLSettings = field(default_factory=KLSettings)
    layers: LayersSettings = field(default_factory=LayersSettings)
    seed: int = 4321

    def validate(self) -> "Compensation":
        require_finite_fields(self)
        get_fit(self.fit)
        if self.tokens < 1:
            raise InputError(f"--compensate-tokens must be at least 1, got {self.tokens}")
        if self.ridge < 0:
            raise InputError(f"--ridge must be 0 or more, got {self.ridge}")
        for part in _parts(type(self)):
            getattr(self, part).validate()
        return self

    def fit_tokens(self, seq_len: int) -> int:
        """Calibration tokens the fit draws: ``tokens``, unless the fit says otherwise (``layers``)."""
        return get_fit(self.fit).tokens(self, seq_len)

    @classmethod
    def of(cls, fit: str = "linear", **settings: Any) -> "Compensation":
        """The settings named flat, as flags and plans name them (``layers_steps=3``); a name no fit reads is a
        ``TypeError``, as for any dataclass."""
        shared: dict[str, Any] = {}
        given: dict[str, dict[str, Any]] = {part: {} for part in _parts(cls)}
        owners = _flat_owners()
        for name, value in settings.items():
            if name not in owners:
                raise TypeError(f"Compensation has no setting {name!r}")
            part, own = owners[name]
            (shared if part is None else given[part])[own] = value
        return cls(fit=fit, **shared, **{part: made(**given[part]) for part, made in _parts(cls).items()})

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> "Compensation":
        """The settings a plan recorded (unchecked); a plan written before its fit gained a setting re-fits as it
        did (the fit's settings' ``upgrade``)."""
        recorded = dict(recorded)
        chosen = _parts(cls).get(recorded.get("fit"))
        return cls.of(**(chosen.upgrade(recorded) if chosen is not None else recorded))

    @classmethod
    def recorded(cls, recorded: dict[str, Any]) -> "Compensation":
        """:meth:`from_dict`, checked."""
        return cls.from_dict(recorded).validate()

    def to_dict(self) -> dict[str, Any]:
        """Flat, in the order plans have always had: ``fit``, ``tokens``, ``ridge``, each fit's settings under its
        prefix, ``seed``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out.update(value.flat() if isinstance(value, FitOptions) else {f.name: value})
        return out


def _flat_owners() -> dict[str, tuple[str | None, str]]:
    """Each flat setting name -> (the :class:`Compensation` field holding it, or None for a shared setting; its
    name there)."""
    owners: dict[str, tuple[str | None, str]] = {}
    for f in fields(Compensation):
        part = _options_type(f)
        if part is None:
            owners[f.name] = (None, f.name)
        else:
            owners.update({part.PREFIX + g.name: (f.name, g.name) for g in fields(part)})
    owners.pop("fit")
    return owners


SHARED_SETTINGS = tuple(name for name, (part, _) in _flat_owners().items() if part is None)
"""The settings every fit reads: its calibration tokens, the least-squares ridge and the sampling seed."""


def declared_settings() -> list[OptionInfo]:
    """The settings a command offers as flags (declared with :func:`~depthprune.flags.option`), named as a plan
    records them, in its order."""
    out: list[OptionInfo] = []
    shared = {info.name: info for info in declared_options(Compensation)}
    for f in fields(Compensation):
        part = _options_type(f)
        if part is not None:
            out += declared_options(part, prefix=part.PREFIX)
        elif f.name in shared:
            out.append(shared[f.name])
    return out


def options_field(options: type[FitOptions]) -> str:
    """The :class:`Compensation` field holding ``options`` (a fit's registration is checked against it)."""
    held = [part for part, made in _parts(Compensation).items() if made is options]
    if not held:
        raise ValueError(f"{options.__name__} is not a part of Compensation: add a field holding it")
    return held[0]
