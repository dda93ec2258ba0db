"""The ``layers`` fit: the kept layer at every gap retrained on what the model outputs.

Fitting the hidden state at a gap (the linear maps) leaves most of what pruning
took: what matters is the model's output. So after the linear maps, the kept
layer before every gap -- all its weights -- (and the ``layers_after`` kept
layers above it, one by default) is trained with Adam on KL(dense || pruned)
between the original model's and the pruned model's next-token distributions, every
other weight frozen. LLM-Streamline (arXiv 2403.19135) trains a replacement
layer for the pruned span the same way in spirit; Prune&Comp (arXiv
2507.18212) calibrates what a removed block leaves behind.

It is cheap by construction:

* the states entering the lowest trained layer are computed once per window
  and cached: no forward and no backward below it;
* the teacher is the dense model's final states on the same windows, cached
  once (one head matmul per step gives its exact distribution: no
  approximation);
* the LM head and the loss run a chunk of tokens at a time, the gradient with
  respect to the final states accumulated chunk by chunk, so full-vocabulary
  logits of a whole batch never exist.

The result is plain weights of the same layers (same depth, same
architecture), written into the checkpoint like any other compensation.

It cannot make the model worse on its own text: some fit windows are held out
of training (``layers_holdout``); every ``layers_check_every`` steps the KL on
them is measured, the best weights seen are kept (the linear start counts as
step 0) and training stops after ``layers_patience`` looks without a better
one. Each training window is seen once (``layers_one_pass``: the fit draws
steps x batch windows). The record says which step was kept, and a held-out
KL that rose is said in one line.

In a data-parallel launch (``torchrun`` / ``accelerate launch``) every process
builds the cached states of every window itself (the same deterministic
result) and each step's batch is split across the processes: each
back-propagates its rows' KL divided by the whole batch's tokens and the
gradients are summed, so every process takes the step one process would take;
the held-out KL is measured a share per process and summed.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..backend import Backend, Stack, Walker, count_work
from ..backend.calls import final_states, record_calls
from ..distributed import processes, share, sum_gradients, summed
from ..engine.merged import base_module, layer_params
from ..evaluate.perplexity import logits_from_hidden, prediction_pairs
from ..fit_settings import LAYERS_STEPS, LAYERS_WEIGHTS_PER_TOKEN, Compensation, LayersSettings
from ..plan import Plan
from .interfaces import Interface, interfaces
from .registry import Changes, Fit, Training, register_fit


TRAIN_PROBE_WINDOWS = 16
"""Training windows the fit's KL before/after is measured on (all of them would cost a fifth of the training)."""


class Trainable(nn.Module):
    """A candidate layer (original, merged or patched) with every parameter a fresh trainable copy, run by
    substituting them into the real layer (whose own weights are never written)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.base = base_module(module)
        self.weights = {name: nn.Parameter(value.detach().clone()) for name, value in layer_params(module).items()}

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.weights.values())

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.weights, args, kwargs)

    def changes(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self.weights.items()}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                self.weights[name].copy_(value)


class BestWeights:
    """The trained layers' weights at the lowest held-out KL seen, and when that was."""

    def __init__(self, trainable: dict[int, Trainable], kl: float | None) -> None:
        self.trainable, self.kl, self.step, self.since = trainable, kl, 0, 0
        self.saved = {p: t.changes() for p, t in trainable.items()}

    def look(self, step: int, kl: float) -> None:
        """Keep the weights if ``kl`` beats the best so far; else count one more look without progress."""
        if self.kl is None or kl < self.kl:
            self.kl, self.step, self.since = kl, step, 0
            self.saved = {p: t.changes() for p, t in self.trainable.items()}
        else:
            self.since += 1

    def restore(self) -> None:
        for p, t in self.trainable.items():
            t.load(self.saved[p])


def trained_positions(found: Sequence[Interface], depth: int, after: int) -> list[int]:
    """The pruned-model positions whose layers train: the kept layer at every gap and the ``after`` kept
    layers above it (the backward runs through them anyway, so training them costs only their weight
    gradients)."""
    positions = {i.position for i in found}
    positions |= {i.position + k for i in found for k in range(1, after + 1) if i.position + k < depth}
    return sorted(positions)


def _kl_and_grad(model: nn.Module, student: torch.Tensor, teacher: torch.Tensor, chunk_tokens: int,
                 backward: bool, count: int | None = None) -> float:
    """Summed KL(teacher || student) over rows of final states; with ``backward``, the gradient of its mean
    over ``count`` rows (default: these rows; in a launch, the whole batch's) flows into ``student``'s graph,
    one chunk of logits at a time."""
    detached = student.detach().requires_grad_(backward)
    total = 0.0
    count = student.shape[0] if count is None else count
    for start in range(0, student.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        with torch.no_grad():
            dense = F.log_softmax(logits_from_hidden(model, teacher[part]).float(), dim=-1)
        with torch.enable_grad() if backward else torch.no_grad():
            logq = F.log_softmax(logits_from_hidden(model, detached[part]).float(), dim=-1)
            kl = F.kl_div(logq, dense, log_target=True, reduction="sum")
            if backward:
                (kl / count).backward()
        total += float(kl.detach())
    if backward:
        student.backward(detached.grad)
    return total


def train_layers(backend: Backend, stack: list[nn.Module], found: Sequence[Interface], walker: Walker,
                 start: Any, lowest_done: int, teacher: list[torch.Tensor], config: Compensation,
                 first_target: int = 1, progress: bool = False
                 ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """Train the layers at ``found``'s gaps in ``stack`` (linear maps already in place) on the walker's windows.

    ``start`` is the walker state key holding the stack's states entering position ``lowest_done``;
    ``teacher`` the dense model's final states per walker batch. Returns the trained layers' parameters by
    position and the fit's record.
    """
    backend.require_memory("--compensate layers")
    began = time.perf_counter()
    options = config.layers
    model = backend.model
    positions = trained_positions(found, len(stack), options.after)
    lowest = positions[0]
    walker.run({"train": Stack(stack[lowest_done:lowest], start=start)})
    windows = []
    for b, (ids, mask) in enumerate(walker.batches):
        entering = walker.state("train", b)
        for r in range(ids.shape[0]):
            windows.append((ids[r : r + 1], mask[r : r + 1], entering[r : r + 1].clone(), teacher[b][r : r + 1].clone()))
    holdout = min(options.holdout, max(0, len(windows) - 1))
    train, held = windows[: len(windows) - holdout], windows[len(windows) - holdout :]

    trainable = {p: Trainable(stack[p]) for p in positions}
    modules = [trainable.get(p, stack[p]) for p in range(len(stack))]
    anchors = [walker.anchor(m) for m in stack]
    frozen = {p: p.requires_grad for p in model.parameters()}
    params = [w for t in trainable.values() for w in t.parameters_to_train()]
    optim = torch.optim.Adam(params, lr=options.lr)
    steps = options.planned_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1))))
    generator = torch.Generator().manual_seed(config.seed)

    per_window = len(modules) - lowest + backend.head_cost()

    def predicted(rows: Sequence[tuple], backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The pruned model's final states that predict a token in ``rows``, and the dense model's."""
        count_work(per_window * len(rows) * (3 if backward else 1))  # a backward pass costs about two forwards
        ids = torch.cat([r[0] for r in rows])
        mask = torch.cat([r[1] for r in rows])
        _, calls = record_calls(model, backend.layers, ids, mask, training=True)
        h = torch.cat([r[2] for r in rows])
        with torch.enable_grad() if backward else torch.no_grad():
            for position in range(lowest, len(modules)):
                h = calls[anchors[position]](modules[position], h)
            final = final_states(model, backend.layers, ids, mask, h)
            student, _ = prediction_pairs(final, ids, mask, first_target)
        dense, _ = prediction_pairs(torch.cat([r[3] for r in rows]), ids, mask, first_target)
        return student, dense

    def train_step(rows: Sequence[tuple]) -> int:
        """Back-propagate the batch's mean KL, this process's share of ``rows`` each; the batch's tokens."""
        mine = share(rows)
        student, dense = predicted(mine, True) if mine else (None, None)
        (count,) = summed(student.shape[0] if mine else 0)
        if mine:
            _kl_and_grad(model, student, dense, options.chunk, True, count=int(count))
        sum_gradients(params)
        return int(count)

    def mean_kl(rows: Sequence[tuple]) -> float | None:
        """The mean KL per token over ``rows``, each process measuring its share."""
        if not rows:
            return None
        mine = share(rows)
        total = count = 0
        for i in range(0, len(mine), options.batch):
            student, dense = predicted(mine[i : i + options.batch], False)
            total += _kl_and_grad(model, student, dense, options.chunk, False)
            count += student.shape[0]
        total, count = summed(total, count)
        return total / max(count, 1)

    tokens, steps_run, curve = 0, 0, []
    watch = bool(held) and options.patience > 0
    order: list[int] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        probe = train[:TRAIN_PROBE_WINDOWS]
        before, held_before = mean_kl(probe), mean_kl(held)
        best = BestWeights(trainable, held_before) if watch else None
        training_began = time.perf_counter()
        with tqdm(total=steps, desc="layers fit", unit="step", disable=not progress) as bar:
            for step in range(1, steps + 1):
                if options.one_pass:
                    if not order:
                        order = torch.randperm(len(train), generator=generator).tolist()
                    pick, order = order[: options.batch], order[options.batch:]
                else:
                    pick = torch.randperm(len(train), generator=generator)[: options.batch].tolist()
                optim.zero_grad()
                tokens += train_step([train[i] for i in pick])
                optim.step()
                schedule.step()
                steps_run = step
                bar.update(1)
                if best is not None and (step % options.check_every == 0 or step == steps):
                    kl = mean_kl(held)
                    curve.append([step, kl])
                    best.look(step, kl)
                    bar.set_postfix_str(f"held-out kl {kl:.4f} (best {best.kl:.4f} at step {best.step})")
                    if best.since >= options.patience:
                        break
        training_s = time.perf_counter() - training_began
        if best is not None:
            best.restore()
        after, held_after = mean_kl(probe), mean_kl(held)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    record = {"trained_positions": positions, "train_windows": len(train), "holdout_windows": len(held),
              "kl_measured_on": len(probe),
              "steps": steps, "steps_run": steps_run, "kept_step": best.step if best is not None else steps_run,
              "stopped_early": steps_run < steps, "holdout_curve": curve,
              "tokens_trained": tokens, "kl_before": before, "kl_after": after,
              "holdout_kl_before": held_before, "holdout_kl_after": held_after,
              "seconds": round(time.perf_counter() - began, 2), **_speed(tokens, training_s)}
    if held_before is not None and held_after is not None and held_after > held_before:
        record["warning"] = (f"--compensate layers: the held-out KL rose ({held_before:.4f} -> {held_after:.4f}); "
                             "the trained layers overfit their windows: use more --compensate-tokens or fewer "
                             "--compensate-steps")
        if processes().main:
            tqdm.write(record["warning"])
    return {p: t.changes() for p, t in trainable.items()}, record


def _speed(tokens: int, seconds: float) -> dict[str, Any]:
    """Training tokens per second (the held-out checks included), overall and per process of the launch."""
    world = processes().world
    rate = tokens / seconds if seconds > 0 else 0.0
    return {"processes": world, "tokens_per_s": round(rate, 1), "tokens_per_s_per_process": round(rate / world, 1)}


def train(training: Training) -> tuple[Changes, str, dict[str, Any]]:
    """The ``layers`` fit's training step, from the states entering the first position it may change."""
    trained, summary = train_layers(training.backend, training.stack, training.found, training.walker,
                                    ("enter", "original", training.start), training.start, training.teacher,
                                    training.config, first_target=training.first_target, progress=training.progress)
    return trained, "layers", summary


def fit_tokens(config: Compensation, seq_len: int) -> int:
    """At least ``layers_tokens`` (its linear maps fit on the same windows), and with ``layers_one_pass`` enough
    that no training window is seen twice (every step's batch new) beside the held-out windows."""
    options = config.layers
    one_pass = (options.planned_steps * options.batch + options.holdout) * seq_len if options.one_pass else 0
    return max(config.tokens, options.tokens, one_pass)


def size(config: Compensation, backend: Backend, plan: Plan, seq_len: int, room: Callable[[], int]
         ) -> tuple[Compensation, dict[str, Any]]:
    """The steps ``plan``'s fit on ``backend`` trains when none were given: one new token per
    :data:`LAYERS_WEIGHTS_PER_TOKEN` weights it trains, at least :data:`LAYERS_STEPS`, and (one pass) no more
    than the windows the text holds (``room()``, drawn only when asked) allow above that; what it chose and why
    is the second value."""
    options = config.layers
    if options.steps is not None:
        return config, {}
    found, _ = interfaces(plan)
    positions = trained_positions(found, len(plan.kept), options.after)
    weights = sum(p.numel() for position in positions for p in backend.layers[plan.kept[position]].parameters())
    wanted = max(LAYERS_STEPS, math.ceil(weights / LAYERS_WEIGHTS_PER_TOKEN / (options.batch * seq_len)))
    sizing: dict[str, Any] = {"trained_weights": weights, "steps_wanted": wanted}
    steps = wanted
    if options.one_pass and wanted > LAYERS_STEPS:
        windows = room()
        steps = max(LAYERS_STEPS, min(wanted, (windows - options.holdout) // options.batch))
        if steps < wanted:
            sizing.update(text_windows=windows, warning=(
                f"--compensate layers: {weights:,} trained weights want {wanted} steps, the calibration "
                f"text holds {windows} windows: training {steps} steps, each window once (a longer --calib "
                "trains more)"))
    sizing["steps"] = steps
    return replace(config, layers=replace(options, steps=steps)), sizing


LAYERS = register_fit(Fit(
    "layers", "linear, then the kept layer at every gap retrained on those distributions, everything else "
    "frozen",
    options=LayersSettings, train=train, fit_tokens=fit_tokens,
    train_cost=lambda config: config.layers.planned_steps * config.layers.batch, size=size, data_parallel=True,
    reference="in the spirit of LLM-Streamline, arXiv 2403.19135"))
