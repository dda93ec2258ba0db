"""SLEB: Streamlining LLMs through Redundancy Verification and Elimination of transformer Blocks
(Song et al., arXiv 2402.09025).

Remove one layer per round, each time the layer whose removal gives the
lowest calibration loss of the model pruned so far::

    current = all layers
    repeat k times:
        j* = argmin_j  loss(current without j)       # nll (SLEB) or kl to the dense model (EvoPress)
        current = current without j*

Unlike one-shot scores (ShortGPT), each round sees the model as pruned so
far, so it never removes two layers that only look redundant together.

Multi-fidelity rounds (EvoPress, arXiv 2410.14649), the default: every
candidate of a round is first scored on a few calibration windows
(``screen_windows``) and only the ``rerank`` best are scored on all of them,
which decide the round. ``exact`` scores every candidate on every window (the
paper's search). Each round's log says which fidelity decided it.
Candidates run on the loss engine: each forks from the current model's state
entering its layer, only the layers above it run, all of a round's candidates in
one walk, the LM head a chunk of tokens at a time. ``protect_first`` / ``protect_last`` keep the first / last
layers out of reach.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from ..backend import Backend, Stack
from ..data.calibration import Calibration
from ..engine.loss import OBJECTIVES, LossEngine
from ..plan import Plan, PlanError
from .registry import MethodOptions, RunContext, Work, option, register
from .target import Target, require


@dataclass
class SLEBOptions(MethodOptions):
    objective: str = option("nll", "calibration loss to minimise: nll (SLEB) or kl (KL to the dense model's "
                            "next-token distribution, as EvoPress)", choices=OBJECTIVES)
    protect_first: int = option(0, "never remove the first N layers")
    protect_last: int = option(0, "never remove the last N layers")
    exact: bool = option(False, "score every candidate on every calibration window (otherwise candidates are "
                         "screened on --screen-windows windows and the --rerank best scored on all)")
    screen_windows: int = option(2, "calibration windows every candidate of a round is screened on")
    rerank: int = option(3, "candidates of a round scored on all windows after the screening")

    def validate(self) -> None:
        if self.protect_first < 0 or self.protect_last < 0:
            raise PlanError("--protect-first and --protect-last must be 0 or more")
        if self.screen_windows < 1 or self.rerank < 1:
            raise PlanError("--screen-windows and --rerank must be at least 1")


def removable_layers(num_layers: int, n_remove: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """The layers a search may remove, refusing a request the protected layers leave no room for."""
    removable = [i for i in range(num_layers) if protect_first <= i < num_layers - protect_last]
    if len(removable) < n_remove:
        raise PlanError(f"only {len(removable)} layers are outside the protected ones, fewer than the "
                        f"{n_remove} to remove; protect fewer layers or remove fewer")
    return removable


def log_round(log: list[dict[str, Any]], losses: dict[int, float], screened: dict[int, float] | None = None,
              fidelity: str = "every candidate on all windows") -> int:
    """Pick a round's layer (lowest loss, lowest index on ties) and log every candidate's loss (and, when the
    round was screened, every candidate's screening loss)."""
    chosen = min(losses, key=lambda i: (losses[i], i))
    entry = {"round": len(log) + 1, "removed": chosen, "loss": losses[chosen], "fidelity": fidelity,
             "losses": {str(i): losses[i] for i in sorted(losses)}}
    if screened is not None:
        entry["screened"] = {str(i): screened[i] for i in sorted(screened)}
    log.append(entry)
    return chosen


def sleb_plan(num_layers: int, kept: list[int], log: list[dict[str, Any]], *, objective: str, n_remove: int,
              protect_first: int, protect_last: int, dense_loss: float, evaluations: int) -> Plan:
    """The plan of a finished search (in memory or streamed): what went, and every round's losses."""
    first_round = {int(i): v for i, v in log[0].get("screened", log[0]["losses"]).items()}
    scores = {}
    if len(first_round) == num_layers:
        name = f"{objective}_without_layer" + ("_screened" if "screened" in log[0] else "")
        scores[name] = [first_round[i] for i in range(num_layers)]
    return Plan(
        method="sleb",
        num_layers=num_layers,
        remove=sorted(set(range(num_layers)) - set(kept)),
        params={"objective": objective, "n_remove": n_remove, "protect_first": protect_first,
                "protect_last": protect_last, "dense_loss": dense_loss,
                "final_loss": log[-1]["loss"], "candidates_evaluated": evaluations},
        scores=scores,
        log=log,
    )


def sleb_search(engine: LossEngine, n_remove: int, *, protect_first: int = 0, protect_last: int = 0,
                screen: LossEngine | None = None, rerank: int = 3, progress: Any = None) -> Plan:
    """Greedy removal of ``n_remove`` layers; every candidate's loss in every round is logged.

    A round is one walk up the current model: candidate "without j" forks from the current model's state
    entering j and runs the layers above it, every candidate advancing together (a streamed model reads each
    kept layer once per round). With ``screen`` (an engine on fewer windows), candidates are screened there
    first and the ``rerank`` best scored on ``engine``'s windows.
    """
    L = engine.num_layers
    removable = removable_layers(L, n_remove, protect_first, protect_last)
    current = list(range(L))
    log: list[dict[str, Any]] = []
    for round_ in range(n_remove):
        reference = [engine.layers[i] for i in current]
        stacks = {"current": Stack(reference)}
        candidates = [layer for layer in current if layer in removable]
        for position, layer in enumerate(current):
            if layer in removable:
                stacks[layer] = Stack(reference[position + 1 :], fork=("current", position))
        if screen is None or len(candidates) <= rerank:
            current.remove(log_round(log, engine.losses(stacks, keys=candidates)))
        else:
            screened = screen.losses(stacks, keys=candidates)
            best = sorted(candidates, key=lambda j: (screened[j], j))[:rerank]
            losses = engine.losses({key: stacks[key] for key in ("current", *best)}, keys=best)
            fidelity = (f"all {len(candidates)} candidates screened on {screen.num_windows} windows, the best "
                        f"{len(best)} on all {engine.num_windows}")
            current.remove(log_round(log, losses, screened, fidelity))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(removed=log[-1]["removed"], loss=f"{log[-1]['loss']:.4f}")
    evaluations = engine.evaluations + (screen.evaluations if screen is not None else 0)
    return sleb_plan(L, current, log, objective=engine.objective, n_remove=n_remove, protect_first=protect_first,
                     protect_last=protect_last, dense_loss=engine.dense_loss, evaluations=evaluations)


def estimated_work(work: Work, options: SLEBOptions) -> float:
    """Layer-windows of the search: every round walks the current model and every candidate above its layer,
    each candidate then scored by the LM head (on the screening windows first, when screened)."""
    screened = not options.exact and options.screen_windows < work.windows
    screen = options.screen_windows if screened else work.windows
    units = (work.layers + work.head) * (work.windows + (screen if screened else 0))
    for r in range(work.remove):
        current = work.layers - r
        walk = current + current * (current - 1) / 2
        units += (walk + current * work.head) * screen
        if screened:
            units += (current + options.rerank * (current / 2 + work.head)) * work.windows
    return units


@register("sleb", "remove layers one at a time, each round the one whose removal hurts calibration loss least",
          SLEBOptions, reference="SLEB, arXiv 2402.09025; kl objective: EvoPress, arXiv 2410.14649",
          cost=estimated_work)
def plan(backend: Backend, calibration: Calibration, target: Target | None, options: SLEBOptions,
         run: RunContext) -> Plan:
    n = require("sleb", target).n_remove(backend.num_layers)
    screened = not options.exact and options.screen_windows < calibration.num_windows
    # at the peak: one set of states per candidate plus the current model's
    sets = backend.num_layers + 1
    with ExitStack() as stack:
        engine = stack.enter_context(LossEngine(backend, calibration, objective=options.objective,
                                                batch_size=run.batch_size, sets=options.rerank + 1 if screened
                                                else sets, progress=run.progress))
        screen = stack.enter_context(LossEngine(backend, calibration.first(options.screen_windows),
                                                objective=options.objective, batch_size=run.batch_size,
                                                sets=sets)) if screened else None
        bar = stack.enter_context(tqdm(total=n, desc="sleb rounds", unit="round", disable=not run.progress))
        plan = sleb_search(engine, n, protect_first=options.protect_first, protect_last=options.protect_last,
                           screen=screen, rerank=options.rerank, progress=bar)
    plan.params.update(exact=not screened, screen_windows=options.screen_windows if screened else None,
                       rerank=options.rerank if screened else None, teacher=engine.teacher_note)
    return plan
