"""``auto``: the best plan depthprune can make at the depth asked for.

Build the candidate plans (by default ShortGPT, angular, SLEB and SLM at the
target depth, each without and with interface compensation where the
architecture can carry it), score every candidate on held-out calibration
windows that none of them was planned or fitted on, and return the best::

    for method in candidates:
        plan = method(model, calibration, target)
        for fit in (none, linear):
            score = loss(plan [+ fit] on held-out windows)    # nll, or kl to the dense model
    return argmin score

Ranking is multi-fidelity (EvoPress, arXiv 2410.14649), as SLEB's rounds:
every distinct candidate is scored on the first ``screen_windows`` held-out
windows, and the ``rerank`` best on all of them, which decide; ``exact`` scores
every candidate on every window. Each candidate's entry says which fidelity
its loss comes from.

Candidates are evaluated on the loss engine without touching the model: a
plan becomes a stack of the original layer modules (merged windows as
``MergedLayer``, compensated layers as ``PatchedLayer``), and all candidates
run in one walk (a streamed model reads each layer once), with no copy. The chosen plan records
every candidate's score in ``params["candidates"]`` and ``log``; its
compensation (if it won with one) is re-fitted on the same windows when the
plan is applied, so the saved model is the candidate that was scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..backend import Backend, Meter, Stack, metered
from ..compensate import (DEFAULT_TOKENS, FITS, Compensation, FitSession, check_supported, fit_compensation,
                          get_fit, interfaces)
from ..data.calibration import Calibration
from ..engine.loss import OBJECTIVES, LossEngine
from ..engine.merged import plan_stack
from ..errors import InputError
from ..plan import Plan, PlanError
from .registry import (METHODS, MethodOptions, RunContext, Work, build_options, get_method, make_plan, option,
                       register)
from .target import Target, require

DEFAULT_CANDIDATES = "shortgpt,angular,sleb,slm"
RECOVERIES = ("none", "layers")
"""``--recover``: none, or the fit that retrains the winner's layers at its gaps (its steps: ``--recover-steps``)."""


@dataclass
class AutoOptions(MethodOptions):
    candidates: str = option(DEFAULT_CANDIDATES, "methods whose plans compete (comma separated)")
    fits: str = option("linear", "compensation tried on every candidate besides none (comma separated: "
                       f"{', '.join(FITS)}; none = no compensated candidates)")
    objective: str = option("kl", "how candidates are ranked on held-out windows: nll, or kl to the dense model",
                            choices=OBJECTIVES)
    compensate_tokens: int = option(DEFAULT_TOKENS, "calibration tokens for each compensation fit")
    exact: bool = option(False, "full fidelity: every candidate's search exact (SLEB's --exact) and every "
                         "candidate ranked on every held-out window")
    screen_windows: int = option(4, "held-out windows every candidate is first ranked on")
    rerank: int = option(3, "candidates ranked on all held-out windows after the screening")
    recover: str = option("none", "after choosing: none, or layers (the winner's kept layer at every gap is "
                          "retrained on the dense model's next-token distributions, --compensate layers)",
                          choices=RECOVERIES)
    recover_steps: int | None = option(None, "training steps of --recover layers (default: sized to the weights "
                                       "it trains, as --compensate-steps)")

    def methods(self) -> list[str]:
        return [m.strip() for m in self.candidates.split(",") if m.strip()]

    def fit_list(self) -> list[str]:
        return [f.strip() for f in self.fits.split(",") if f.strip() and f.strip() != "none"]

    def validate(self) -> None:
        names = self.methods()
        if not names:
            raise PlanError("--candidates is empty: name at least one method")
        for name in names:
            if name == "auto":
                raise PlanError("--candidates cannot include auto itself")
            get_method(name)
        for fit in self.fit_list():
            if fit not in FITS:
                raise PlanError(f"--fits: unknown compensation {fit!r}; use none or {', '.join(FITS)}")
        if self.compensate_tokens < 1:
            raise PlanError(f"--compensate-tokens must be at least 1, got {self.compensate_tokens}")
        if min(self.screen_windows, self.rerank, 1 if self.recover_steps is None else self.recover_steps) < 1:
            raise PlanError("--screen-windows, --rerank and --recover-steps must be at least 1")


def estimated_work(work: Work, options: AutoOptions, methods: list[str], fits: list[str], fit_windows: int,
                   heldout_windows: int) -> float:
    """Layer-windows of the whole job: every candidate's search, one walk of the original over the fit windows
    plus each fit from about the middle of the model (a trained fit: its steps, forward and backward), and the
    ranking walk with every candidate's LM head on the held-out windows."""
    units = sum(METHODS[m].estimate(work, _options_for(m, options)) for m in methods)
    candidates = len(methods) * (1 + len(fits))
    if fits:
        units += work.layers * fit_windows
        for fit in fits:
            units += len(methods) * work.layers / 2 * fit_windows
            train_cost = get_fit(fit).train_cost
            if train_cost is not None:
                units += len(methods) * train_cost(Compensation(fit=fit)) * 3 * (work.layers / 2 + work.head)
    screen = ranking_screen(options, candidates, heldout_windows)
    if screen is None:
        units += (candidates + 1) * (work.layers + work.head) * heldout_windows
    else:
        units += (candidates + 1) * (work.layers + work.head) * screen
        units += (options.rerank + 1) * (work.layers + work.head) * heldout_windows
    return units


def ranking_screen(options: AutoOptions, candidates: int, heldout_windows: int) -> int | None:
    """Held-out windows the candidates are screened on, or None when every candidate is ranked on all (exact,
    or screening would save nothing)."""
    if options.exact or options.screen_windows >= heldout_windows or candidates <= options.rerank:
        return None
    return options.screen_windows


def rank(backend: Backend, heldout: Calibration, stacks: dict[int, Stack], options: AutoOptions,
         batch_size: int | None) -> tuple[dict[int, float], dict[int, str], float, str | None]:
    """Every candidate's held-out loss and its fidelity ("all" windows, or "screen": only the screening
    windows, not among the best ``rerank`` there), the dense model's loss and the teacher's note."""
    screen = ranking_screen(options, len(stacks), heldout.num_windows)
    fidelity = {k: "all" for k in stacks}
    losses: dict[int, float] = {}
    if screen is not None:
        with LossEngine(backend, heldout.first(screen), objective=options.objective, batch_size=batch_size,
                        sets=len(stacks)) as engine:
            losses = engine.losses(stacks)
        best = sorted(losses, key=lambda k: (losses[k], k))[: options.rerank]
        fidelity = {k: "all" if k in best else "screen" for k in stacks}
        stacks = {k: stacks[k] for k in best}
    with LossEngine(backend, heldout, objective=options.objective, batch_size=batch_size,
                    sets=len(stacks)) as engine:
        losses.update(engine.losses(stacks))
        return losses, fidelity, engine.dense_loss, engine.teacher_note


def _decision(plan: Plan) -> tuple:
    """What a plan does to the model (two methods can make the same plan; it is fitted and scored once)."""
    return tuple(plan.remove), tuple(plan.merges)


def _options_for(method: str, options: AutoOptions) -> MethodOptions:
    """A candidate method's options: auto's objective and fidelity where the method takes them."""
    declared = {info.name for info in METHODS[method].options.infos()}
    wanted = {"objective": options.objective, "exact": options.exact}
    return build_options(method, {k: v for k, v in wanted.items() if k in declared})


Planned = list[tuple[str, Plan, float]]
"""Each candidate method, its plan at the target depth and the seconds it took."""


@dataclass
class Candidates:
    """The ranking's entries: every planned method without and with each fit (``entries``, the records the
    plan keeps), the plan and fit settings of each (``chosen_from``), their timings, and the entry that scores
    each distinct (decision, fit) (``first``: two methods can make the same plan; it is fitted and scored
    once)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    chosen_from: list[tuple[Plan, Compensation | None]] = field(default_factory=list)
    first: dict[tuple, int] = field(default_factory=dict)

    def scored(self) -> list[int]:
        return list(self.first.values())


def plan_candidates(backend: Backend, calibration: Calibration, n: int, options: AutoOptions, run: RunContext,
                    bar: tqdm) -> Planned:
    """Step 1: every candidate method's plan removing ``n`` layers."""
    planned: Planned = []
    for method in options.methods():
        bar.set_postfix_str(f"planning {method}")
        start = time.perf_counter()
        candidate = make_plan(method, backend, calibration, Target(remove=n), options=_options_for(
            method, options), batch_size=run.batch_size, progress=False, data=run.data)
        planned.append((method, candidate, round(time.perf_counter() - start, 2)))
    return planned


def with_fits(planned: Planned, fits: list[str], options: AutoOptions) -> Candidates:
    """Each plan without compensation and, where it leaves a gap, with each of ``fits``."""
    out = Candidates()
    for method, candidate, seconds in planned:
        for fit in ["none", *(fits if interfaces(candidate)[0] else [])]:
            key = (_decision(candidate), fit)
            entry = {"method": method, "compensation": fit, "plan": candidate.summary(),
                     "dropped": candidate.dropped}
            out.timings.append({"plan_seconds": seconds})
            if key in out.first:
                entry["same_as"] = out.entries[out.first[key]]["method"]
            else:
                out.first[key] = len(out.entries)
            out.entries.append(entry)
            out.chosen_from.append((candidate, None if fit == "none" else
                                    Compensation(fit=fit, tokens=options.compensate_tokens)))
    return out


def fit_candidates(backend: Backend, candidates: Candidates, options: AutoOptions, run: RunContext,
                   bar: tqdm) -> dict[int, Stack]:
    """Step 2: the stack every distinct candidate is ranked as: its fit's maps folded in (all fitted on the same
    windows, sharing the original model's states), or the plan's stack of the original layers."""
    stacks: dict[int, Stack] = {}
    entries, chosen_from = candidates.entries, candidates.chosen_from
    to_fit = [k for k in candidates.scored() if entries[k]["compensation"] != "none"]
    if to_fit:
        bar.set_postfix_str("fitting compensation")
        fit_batches = run.data.fit_batches(options.compensate_tokens, Compensation.seed)
        with FitSession(backend, fit_batches, [chosen_from[k][0] for k in to_fit],
                        teacher=any(get_fit(entries[k]["compensation"]).trains for k in to_fit),
                        first_target=run.data.fit_first_target(options.compensate_tokens, Compensation.seed)
                        ) as session:
            for k in to_fit:
                start = time.perf_counter()
                stacks[k] = Stack(fit_compensation(backend, chosen_from[k][0], fit_batches, chosen_from[k][1],
                                                   session=session).stack)
                candidates.timings[k]["fit_seconds"] = round(time.perf_counter() - start, 2)
    layers = list(backend.layers)
    for k in candidates.scored():
        stacks.setdefault(k, Stack(plan_stack(chosen_from[k][0], layers, backend.spec)))
    return stacks


def usable_fits(backend: Backend, options: AutoOptions) -> tuple[list[str], str | None]:
    """The fits the candidates are tried with (none where the architecture cannot carry a map, with the reason),
    each refused on a streamed model if it needs the model in memory, as ``--recover`` is."""
    fits = options.fit_list()
    try:
        check_supported(backend.spec)
    except InputError as err:
        unsupported, fits = str(err), []
    else:
        unsupported = None
    for fit in fits:
        if get_fit(fit).trains:
            backend.require_memory(f"--fits {fit}")
    if options.recover != "none":
        backend.require_memory(f"--recover {options.recover}")
    return fits, unsupported


@register("auto", "build the candidate plans (with and without compensation), keep the one with the lowest "
          "held-out loss", AutoOptions, reference="depthprune")
def plan(backend: Backend, calibration: Calibration, target: Target | None, options: AutoOptions,
         run: RunContext) -> Plan:
    n = require("auto", target).n_remove(backend.num_layers)
    if run.data is None:
        raise PlanError("--method auto ranks plans on held-out windows drawn from the calibration text: run it "
                        "through a job (prune, run, bench, depthprune.run_job)")
    fits, unsupported = usable_fits(backend, options)
    heldout = run.data.heldout()
    fit_windows = -(-options.compensate_tokens // int(calibration.input_ids.shape[1])) if fits else 0
    work = Work(backend.num_layers, n, calibration.num_windows, backend.head_cost())
    total = estimated_work(work, options, options.methods(), fits, fit_windows, heldout.num_windows)
    with tqdm(total=round(total), desc="auto", unit=" layer-windows", disable=not run.progress,
              bar_format="{l_bar}{bar}| [{elapsed}<{remaining}] {postfix}") as bar, metered(Meter(bar.update)):
        candidates = with_fits(plan_candidates(backend, calibration, n, options, run, bar), fits, options)
        stacks = fit_candidates(backend, candidates, options, run, bar)
        bar.set_postfix_str(f"ranking {len(stacks)} candidates")
        start = time.perf_counter()
        losses, fidelity, dense_loss, teacher = rank(backend, heldout, stacks, options, run.batch_size)
        run.notes.update(candidate_seconds=candidates.timings,
                         ranking_seconds=round(time.perf_counter() - start, 2), estimated_layer_windows=round(total))
    return chosen_plan(candidates, losses, fidelity, options, {
        "objective": options.objective, "dense_heldout_loss": dense_loss, "heldout_windows": heldout.num_windows,
        "teacher": teacher, "unsupported": unsupported})


def chosen_plan(candidates: Candidates, losses: dict[int, float], fidelity: dict[int, str], options: AutoOptions,
                ranking: dict[str, Any]) -> Plan:
    """Step 3's outcome: the candidate with the lowest loss on all held-out windows, as auto's plan, recording
    every candidate's loss (and, with ``--recover``, the fit that retrains its layers)."""
    entries, chosen_from = candidates.entries, candidates.chosen_from
    for entry, (candidate, compensation) in zip(entries, chosen_from):
        k = candidates.first[(_decision(candidate), entry["compensation"])]
        entry["loss"], entry["fidelity"] = losses[k], fidelity[k]
    best_index = min((k for k in range(len(entries)) if entries[k]["fidelity"] == "all"),
                     key=lambda k: entries[k]["loss"])
    best, compensation = chosen_from[best_index]
    chosen = entries[best_index]
    if options.recover != "none" and interfaces(best)[0]:
        compensation = Compensation.of(fit=options.recover, tokens=options.compensate_tokens,
                                       layers_steps=options.recover_steps)
    return Plan(
        method="auto",
        num_layers=best.num_layers,
        remove=best.remove,
        merges=best.merges,
        params={"chosen": f"{chosen['method']}" + (f"+{chosen['compensation']}" if chosen_from[best_index][1]
                                                   else ""), "recover": options.recover,
                "objective": ranking["objective"], "heldout_loss": chosen["loss"],
                "dense_heldout_loss": ranking["dense_heldout_loss"], "heldout_windows": ranking["heldout_windows"],
                "teacher": ranking["teacher"],
                "ranking": "exact" if set(fidelity.values()) == {"all"} else
                f"screened on {options.screen_windows} windows, best {options.rerank} on all", "candidates": entries,
                "chosen_params": best.params,
                "compensation_unsupported": ranking["unsupported"]},
        scores=best.scores,
        log=entries,
        compensation=compensation,
    )
