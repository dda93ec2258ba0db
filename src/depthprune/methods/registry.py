"""The method registry: every method declares its options and registers a ``plan`` function.

A method module (``shortgpt.py``, ``slm.py``, ...) defines

* an options dataclass derived from :class:`MethodOptions` whose fields carry
  a default and a help text (:func:`~depthprune.flags.option`), checked in ``validate``;
* ``plan(model, calibration, target, options, run) -> Plan``, decorated with
  :func:`register`.

The registry builds options from plain values (Python keywords or command-line
flags), so an option a method does not take is an error that names the options
it does take, and ``depthprune methods`` / ``prune --help`` print every
method's options from the same declarations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

from torch import nn

from ..backend import Backend, InMemoryBackend
from ..checks import require_finite_fields, require_finite_result
from ..data.calibration import Calibration
from ..flags import OptionInfo, declared_options, option  # noqa: F401  (option: for the methods)
from ..plan import Plan, PlanError
from .target import Target, require


@dataclass
class MethodOptions:
    """Base of every method's options; subclasses declare fields with :func:`option`."""

    HELP: ClassVar[dict[str, str]] = {}
    """Help a subclass gives an option it inherits (its own default, its own meaning), by field name: the field
    is declared once, where its type and default are."""

    def __post_init__(self) -> None:
        require_finite_fields(self)
        self.validate()

    def validate(self) -> None:
        """Check values that can be checked without the model (raise :class:`PlanError`)."""

    def check_depth(self, num_layers: int) -> None:
        """Check option values against the model's depth (layer ranges, block sizes) once it is known, which
        is before loading for a model on disk (its config); methods with such options override this."""

    def check_target(self, method: str, target: Target | None) -> None:
        """Most methods need a depth target; threshold and block methods override this."""
        require(method, target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def infos(cls) -> list[OptionInfo]:
        return [replace(info, help=cls.HELP.get(info.name, info.help)) for info in declared_options(cls)]

    def check_choices(self) -> None:
        for info in self.infos():
            value = getattr(self, info.name)
            if info.choices and value is not None and value not in info.choices:
                raise PlanError(f"{info.flag} must be one of {', '.join(map(str, info.choices))}, got {value!r}")


@dataclass(frozen=True)
class RunContext:
    """How a method runs, not what it decides: forward batch size (sequences per pass), progress bars,
    where more calibration text can be drawn from (``data``: held-out windows and fit batches, see
    :class:`CalibrationData`; the job provides it, a bare ``make_plan`` call may not), and ``notes``: what
    the method reports about the run rather than the decision (timings), which the job adds to its record."""

    batch_size: int = 8
    progress: bool = True
    data: "CalibrationData | None" = None
    notes: dict[str, Any] = field(default_factory=dict)


class CalibrationData(Protocol):
    def heldout(self) -> Calibration:
        """Windows disjoint from the planning windows that no fit ever sees."""

    def fit_batches(self, tokens: int, seed: int) -> list:
        """About ``tokens`` tokens (never the held-out windows) as batches on the model's device."""

    def fit_first_target(self, tokens: int, seed: int) -> int:
        """Where those windows' predicted tokens start (after BOS)."""


PlanFn = Callable[["Backend", Calibration, "Target | None", Any, RunContext], Plan]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: type[MethodOptions]
    plan: PlanFn
    reference: str = ""
    cost: "CostFn | None" = None

    def estimate(self, work: "Work", options: MethodOptions) -> float:
        """Layer-windows this method's search runs (see :class:`Work`); one pass unless it declares more."""
        return self.cost(work, options) if self.cost is not None else work.layers * work.windows

    def describe(self) -> str:
        lines = [f"{self.name}: {self.summary}" + (f" ({self.reference})" if self.reference else "")]
        infos = self.options.infos()
        lines += [f"    {info.describe()}" for info in infos] or ["    (no options of its own)"]
        return "\n".join(lines)


@dataclass(frozen=True)
class Work:
    """What a planning job's cost depends on, for estimates in layer-windows (one decoder layer run on one
    calibration window; ``head`` is the LM head's cost in the same unit)."""

    layers: int
    remove: int
    windows: int
    head: float


CostFn = Callable[[Work, Any], float]

METHODS: dict[str, Method] = {}


def register(name: str, summary: str, options: type[MethodOptions], *, reference: str = "",
             cost: CostFn | None = None):
    """Decorator: register ``plan`` as method ``name`` with its options class (and, for a search costlier than
    one pass, an estimate of its work in layer-windows, which a job's progress turns into time left)."""

    def deco(fn: PlanFn) -> PlanFn:
        METHODS[name] = Method(name, summary, options, fn, reference, cost)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PlanError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def _flags(method: Method) -> str:
    names = [info.flag for info in method.options.infos()]
    return ", ".join(names) if names else "none"


def build_options(method: str, values: Mapping[str, Any] | None = None) -> MethodOptions:
    """The options of ``method`` from plain values; an option it does not declare is an error."""
    spec = get_method(method)
    values = dict(values or {})
    declared = {info.name for info in spec.options.infos()}
    unknown = [k for k in values if k not in declared]
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise PlanError(f"--method {method} does not take {flags}; its options: {_flags(spec)} "
                        "(see `depthprune methods`)")
    opts = spec.options(**values)
    opts.check_choices()
    return opts


def check_request(method: str, target: Target | None, options: MethodOptions, num_layers: int | None = None) -> None:
    """Everything about a planning request that can be checked before a model is loaded; with ``num_layers``
    (from the model's config) also whether the target can be met and the options fit the model's depth."""
    if target is not None:
        target.validate()
    options.check_target(method, target)
    if num_layers is not None:
        if target is not None and target.given:
            target.n_remove(num_layers)
        options.check_depth(num_layers)


def make_plan(
    method: str,
    model: "nn.Module | Backend",
    calibration: Calibration,
    target: Target | None = None,
    *,
    options: MethodOptions | None = None,
    batch_size: int = 8,
    progress: bool = True,
    data: CalibrationData | None = None,
    notes: dict[str, Any] | None = None,
    **values: Any,
) -> Plan:
    """Run a registered method: ``make_plan("slm", model, cal, threshold=0.72)`` or with ``options=``.

    ``model`` is a model (planned in memory) or a :class:`~depthprune.backend.Backend` (e.g. a streamed one).
    """
    spec = get_method(method)
    if options is None:
        options = build_options(method, values)
    elif values:
        raise PlanError("pass method options either as options= or as keywords, not both")
    elif not isinstance(options, spec.options):
        raise PlanError(f"--method {method} takes {spec.options.__name__}, got {type(options).__name__}")
    backend = InMemoryBackend.of(model)
    check_request(method, target, options, backend.num_layers)
    if batch_size < 1:
        raise PlanError(f"--batch-size must be at least 1, got {batch_size}")
    run = RunContext(batch_size, progress, data, notes if notes is not None else {})
    plan = spec.plan(backend, calibration, target, options, run)
    require_finite_result(plan.scores, f"--method {method}'s layer scores")
    return plan


# ---------------------------------------------------------------- command-line flags


def coerce(info: OptionInfo, text: str | bool) -> Any:
    """Turn a flag's text into the option's type (``none`` clears an optional value)."""
    if isinstance(text, bool):
        return text
    if info.optional and text.lower() in ("none", "null", ""):
        return None
    if info.type is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise PlanError(f"{info.flag} takes true or false, got {text!r}")
    try:
        return info.type(text)
    except ValueError:
        raise PlanError(f"{info.flag} takes a {info.type.__name__}, got {text!r}") from None


def parse_flags(args: Sequence[str], methods: Sequence[str], *, command: str) -> dict[str, dict[str, Any]]:
    """Method options given as flags (``--threshold 0.7``, ``--operator=average``, ``--no-flag``).

    Each flag goes to every listed method that declares it; a flag none of
    them declares is an error naming the options they do take.
    """
    specs = [get_method(m) for m in methods]
    infos: dict[str, list[tuple[str, OptionInfo]]] = {}
    for spec in specs:
        for info in spec.options.infos():
            infos.setdefault(_key(info), []).append((spec.name, info))
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise PlanError(f"unexpected argument {token!r} for `depthprune {command}`")
        name, has_value, value = token[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in infos and infos[key[3:]][0][1].type is bool
        if negated:
            key = key[3:]
        if key not in infos:
            raise PlanError(_unknown_flag(name, key, specs, command))
        is_bool = infos[key][0][1].type is bool
        if negated:
            raw: str | bool = False
        elif has_value:
            raw = value
        elif is_bool:
            raw = True
        else:
            if i + 1 >= len(args):
                raise PlanError(f"--{name} needs a value")
            i += 1
            raw = args[i]
        for method, info in infos[key]:
            out[method][info.name] = info.field_value(coerce(info, raw))
        i += 1
    return out


def _key(info: OptionInfo) -> str:
    """How a flag is looked up: its name with underscores (``--max-remove`` and ``--max_remove`` both work)."""
    return info.flag_name.replace("-", "_")


def _unknown_flag(name: str, key: str, specs: list[Method], command: str) -> str:
    takers = [m.name for m in METHODS.values() if any(_key(i) == key for i in m.options.infos())]
    listed = ", ".join(s.name for s in specs)
    own = "; ".join(f"{s.name}: {_flags(s)}" for s in specs)
    if takers:
        return (f"--method {listed} does not take --{name} (an option of {', '.join(takers)}); "
                f"its options: {own} (see `depthprune methods`)")
    return (f"no such option --{name}: not an option of `depthprune {command}` (see --help) nor of "
            f"--method {listed} (options: {own})")


def describe_methods() -> str:
    return "\n\n".join(m.describe() for m in METHODS.values())
