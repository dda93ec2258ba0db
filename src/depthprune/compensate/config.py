"""How interface maps are fitted: the settings a plan records, so re-applying the plan re-fits the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..checks import require_finite_fields
from ..errors import InputError
from ..flags import declared_options, option
from .registry import FITS, SHARED_SETTINGS, get_fit

DEFAULT_TOKENS = 8192
"""Fit tokens by default: with the ridge, 8k tokens fit SmolLM2's maps as well as 64k or 128k (see the docs)."""
LAYERS_STEPS = 100
"""Training steps of the ``layers`` fit by default (``--compensate-steps``)."""
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


@dataclass
class Compensation:
    """How to fit the interface maps (recorded in the plan, so re-applying the plan re-fits the same way).

    The settings a command offers are declared with :func:`~depthprune.flags.option` (their flag, default and
    help, here once); a fit reads the ones its registration names (:mod:`.registry`).
    """

    fit: str = "linear"
    tokens: int = option(DEFAULT_TOKENS, "Calibration tokens for the compensation fit.", flag="compensate-tokens")
    ridge: float = option(1e-3, "Compensation ridge towards the identity (x trace/d).")
    steps: int = 300
    lr: float = 1e-3
    refine_tokens: int = 16384
    kl_steps: int = 150
    kl_lr: float = 1e-4
    kl_windows: int = 32
    kl_batch: int = 4
    layers_steps: int = option(LAYERS_STEPS, "training steps (4 windows each); more steps recover more, the cost "
                               "grows linearly (100 steps of SmolLM2-135M: about 2.5 minutes on 2 CPU cores).",
                               flag="compensate-steps")
    layers_lr: float = 5e-4
    layers_batch: int = 4
    layers_after: int = option(LAYERS_AFTER, "how many kept layers above each gap train beside the one before it "
                               "(a larger number trains every layer above the gap; on SmolLM2 all of them cost 20% "
                               "more time for a few points of perplexity, the same KL).", flag="compensate-above")
    layers_tokens: int = LAYERS_TOKENS
    layers_holdout: int = LAYERS_HOLDOUT
    layers_chunk: int = 512
    layers_check_every: int = LAYERS_CHECK_EVERY
    layers_patience: int = LAYERS_PATIENCE
    layers_one_pass: bool = True
    seed: int = 4321

    def validate(self) -> "Compensation":
        require_finite_fields(self)
        get_fit(self.fit)
        if self.tokens < 1:
            raise InputError(f"--compensate-tokens must be at least 1, got {self.tokens}")
        if self.ridge < 0:
            raise InputError(f"--ridge must be 0 or more, got {self.ridge}")
        if min(self.steps, self.kl_steps) < 0 or min(self.lr, self.kl_lr) <= 0:
            raise InputError("compensation steps must be 0 or more and learning rates positive")
        if min(self.refine_tokens, self.layers_tokens, self.kl_windows, self.kl_batch, self.layers_batch,
               self.layers_chunk) < 1:
            raise InputError("compensation token, window and batch counts must be positive")
        if min(self.layers_steps, self.layers_holdout, self.layers_after, self.layers_patience) < 0 or \
                self.layers_lr <= 0 or self.layers_check_every < 1:
            raise InputError("--compensate layers: steps, held-out windows and layers after the gap must be 0 or "
                             "more, the learning rate positive")
        return self

    def fit_tokens(self, seq_len: int) -> int:
        """Calibration tokens the fit draws: ``tokens``, unless the fit says otherwise (``layers``)."""
        return FITS[self.fit].tokens(self, seq_len)

    @classmethod
    def recorded(cls, fields: dict[str, Any]) -> "Compensation":
        """The settings a plan recorded, checked; a plan written before its fit gained a setting re-fits as it
        did (the fit's ``upgrade``)."""
        fields = dict(fields)
        upgrade = FITS[fields["fit"]].upgrade if fields.get("fit") in FITS else None
        return cls(**(upgrade(fields) if upgrade is not None else fields)).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_fits() -> str:
    """Every registered fit, what it does and the settings it reads with their defaults (and the command-line
    flag of those a command offers)."""
    defaults = Compensation().to_dict()
    flags = {info.name: info.flag for info in declared_options(Compensation)}
    lines = []
    for fit in FITS.values():
        needs = "; trains through the layers above each gap: the model in memory" if fit.trains else ""
        lines.append(f"{fit.name}: {fit.summary}" + (f" ({fit.reference})" if fit.reference else "") + needs)
        for setting in (*SHARED_SETTINGS, *fit.settings):
            flag = f" ({flags[setting]})" if setting in flags else ""
            lines.append(f"    {setting}{flag}: {defaults[setting]}")
    return "\n".join(lines)
