"""Interface compensation: a linear map fitted where layers were removed, folded into an existing weight.

ReplaceMe (arXiv 2505.02819) and LinearPatch (arXiv 2505.24680): after a run
of layers is removed (or merged), the layer kept just before the gap now hands
the next layer a hidden state that differs from what the original model had
there. Fit a d x d map T on that kept layer's MLP output M so that

    Y + M T  ~  H_t        (Y = the kept layer's output minus M, H_t = the original model's
                            hidden state after the last layer the gap stands for)

and fold it into the MLP's down projection (``W <- T^T W``, ``b <- T^T b``;
GPT-2's Conv1D stores W transposed, so ``W <- W T``): the checkpoint keeps its
architecture, parameter count and plain-transformers loading. Gaps are fitted
bottom-up, each on the model as pruned and compensated so far.

Fits (``fit``):

``linear``  least squares in float64, from normal equations accumulated batch
            by batch (memory O(d^2), not O(tokens x d)), with a ridge pulling
            T towards the identity (``ridge`` x trace(M^T M) / d), so a fit
            on few tokens cannot wander far from "no change";
``cosine``  ``linear``, then Adam steps on the mean per-token
            ``1 - cos(Y + M T, H_t)`` over a subsample of the tokens (ReplaceMe's
            better variant).

Not foldable: a gap before the first kept layer (nothing precedes it: skipped
and recorded), and families whose MLP output passes through a norm before the
residual add (Gemma 2/3's ``post_feedforward_layernorm``): refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .models.arch import ArchSpec, get_layers, get_path, per_layer_config_values, spec_for, temporary_layer_stack
from .models.forward import Batch, layer_hooks, run_decoder
from .plan import Plan

FITS = ("linear", "cosine")
DEFAULT_TOKENS = 8192
"""Fit tokens by default: with the ridge, 8k tokens fit SmolLM2's maps as well as 64k or 128k (see the README)."""


@dataclass
class Compensation:
    """How to fit the interface maps (recorded in the plan, so re-applying the plan re-fits the same way)."""

    fit: str = "linear"
    tokens: int = DEFAULT_TOKENS
    ridge: float = 1e-3
    steps: int = 300
    lr: float = 1e-3
    refine_tokens: int = 16384
    seed: int = 4321

    def validate(self) -> "Compensation":
        if self.fit not in FITS:
            raise InputError(f"unknown compensation {self.fit!r}: use one of {', '.join(FITS)}")
        if self.tokens < 1:
            raise InputError(f"--compensate-tokens must be at least 1, got {self.tokens}")
        if self.ridge < 0:
            raise InputError(f"--ridge must be 0 or more, got {self.ridge}")
        if self.steps < 0 or self.lr <= 0 or self.refine_tokens < 1:
            raise InputError("compensation steps must be 0 or more, lr and refine tokens positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Interface:
    """The kept layer at ``position`` of the pruned stack (original index ``layer``) must hand on what the
    original model had after its layer ``target``."""

    position: int
    layer: int
    target: int


def check_supported(spec: ArchSpec) -> None:
    if spec.post_mlp_norm is not None:
        raise InputError(
            f"compensation cannot be folded into {spec.family}: its MLP output passes through "
            f"{spec.post_mlp_norm} before the residual add, so no existing weight can carry a full linear map; "
            "prune without --compensate"
        )


def interfaces(plan: Plan) -> tuple[list[Interface], list[str]]:
    """Every place where the pruned model stops matching the original, and notes on gaps that cannot be fitted."""
    ends = {m.low: m.high for m in plan.merges}
    kept = plan.kept
    found, notes = [], []
    if kept and kept[0] > 0:
        notes.append(f"layers 0..{kept[0] - 1} are gone with no layer before them to carry a map: not compensated")
    for position, layer in enumerate(kept):
        following = kept[position + 1] if position + 1 < len(kept) else plan.num_layers
        if following - 1 > layer:
            found.append(Interface(position, layer, following - 1))
        elif ends.get(layer, layer) > layer:
            found.append(Interface(position, layer, ends[layer]))
    return found, notes


@torch.inference_mode()
def capture_targets(model: nn.Module, batches: Sequence[Batch], indices: set[int]) -> dict[int, list[torch.Tensor]]:
    """The original model's hidden state after each layer in ``indices``, per batch (on the CPU)."""
    wanted = sorted(indices)
    layers = get_layers(model)
    out: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    with layer_hooks([layers[i] for i in wanted], indices=wanted, post=lambda i, h: out[i].append(h.float().cpu())):
        for ids, mask in batches:
            run_decoder(model, ids, mask)
    return out


class _Stop(Exception):
    """Raised after the layer being fitted: nothing above it needs to run."""


def _down_module(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    from .engine.merged import base_module

    return get_path(base_module(layer), spec.down_proj)


@torch.inference_mode()
def _layer_split(model: nn.Module, stack: list[nn.Module] | None, per_layer: dict[str, list] | None, position: int,
                 batches: Sequence[Batch], spec: ArchSpec):
    """Per batch: the kept layer's MLP output M and the rest of its output Y (valid tokens only, float64)."""
    layer = stack[position] if stack is not None else get_layers(model)[position]
    down = _down_module(layer, spec)
    seen: dict[str, torch.Tensor] = {}
    hook_down = down.register_forward_hook(lambda m, a, o: seen.__setitem__("m", o))

    def stop(i: int, h: torch.Tensor) -> None:
        seen["out"] = h
        raise _Stop

    try:
        for ids, mask in batches:
            with layer_hooks([layer], post=stop):
                try:
                    if stack is None:
                        run_decoder(model, ids, mask)
                    else:
                        with temporary_layer_stack(model, stack, per_layer):
                            run_decoder(model, ids, mask)
                except _Stop:
                    pass
            keep = mask.bool()
            m = seen["m"].reshape(mask.shape + (-1,))[keep].double()
            yield m, seen["out"][keep].double() - m, keep
    finally:
        hook_down.remove()


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    d = a.shape[0]
    lam = ridge * float(torch.trace(a)) / d
    eye = torch.eye(d, dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, b + lam * eye)


def _residual(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: float) -> float:
    """||M T - (H - Y)||^2 / ||H - Y||^2 from the accumulated normal equations."""
    return float((torch.trace(t.T @ a @ t) - 2 * torch.trace(t.T @ b) + c) / c)


def _refine_cosine(t: torch.Tensor, sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   config: Compensation) -> torch.Tensor:
    m = torch.cat([s[0] for s in sample]).float()
    y = torch.cat([s[1] for s in sample]).float()
    h = torch.cat([s[2] for s in sample]).float()
    param = nn.Parameter(t.float().clone())
    optim = torch.optim.Adam([param], lr=config.lr)
    with torch.enable_grad():
        for _ in range(config.steps):
            optim.zero_grad()
            loss = (1 - F.cosine_similarity(y + m @ param, h, dim=-1)).mean()
            loss.backward()
            optim.step()
    return param.detach().double()


def fit_interface(model: nn.Module, stack: list[nn.Module] | None, per_layer: dict[str, list] | None,
                  interface: Interface, batches: Sequence[Batch], targets: list[torch.Tensor],
                  config: Compensation, spec: ArchSpec) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fit T for one interface on the stack as compensated so far; returns T and the fit's record."""
    a = b = None
    c, tokens = 0.0, 0
    sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    generator = torch.Generator().manual_seed(config.seed)
    budget = config.refine_tokens
    for (m, y, keep), target in zip(_layer_split(model, stack, per_layer, interface.position, batches, spec),
                                    targets):
        h = target.to(keep.device)[keep].double().cpu()
        m, y = m.cpu(), y.cpu()
        goal = h - y
        a = m.T @ m if a is None else a + m.T @ m
        b = m.T @ goal if b is None else b + m.T @ goal
        c += float((goal * goal).sum())
        tokens += m.shape[0]
        if config.fit == "cosine" and budget > 0:
            take = torch.randperm(m.shape[0], generator=generator)[:budget]
            sample.append((m[take], y[take], h[take]))
            budget -= len(take)
    t = _solve(a, b, config.ridge)
    record = {"layer": interface.layer, "position": interface.position, "target": interface.target,
              "tokens": tokens, "fit": config.fit, "residual_before": _residual(torch.eye(len(a), dtype=a.dtype), a, b, c),
              "residual_linear": _residual(t, a, b, c)}
    if config.fit == "cosine" and config.steps > 0:
        t = _refine_cosine(t, sample, config)
        record["residual_after"] = _residual(t, a, b, c)
        record["refine_tokens"] = sum(len(s[0]) for s in sample)
    else:
        record["residual_after"] = record["residual_linear"]
    return t, record


def folded(params: dict[str, torch.Tensor], t: torch.Tensor, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """A layer's down-projection parameters (``{path.weight, path.bias}`` as the layer holds them) with T folded
    in, so the projection's output becomes ``output @ T``."""
    out = {}
    for name in (f"{spec.down_proj}.weight", f"{spec.down_proj}.bias"):
        if params.get(name) is None:
            continue
        value = params[name].detach()
        t64 = t.to(value.device, torch.float64)
        if name.endswith(".bias"):
            new = value.double() @ t64
        else:
            new = value.double() @ t64 if spec.conv1d else t64.T @ value.double()
        out[name] = new.to(value.dtype)
    return out


@torch.no_grad()
def fold_in_place(layer: nn.Module, t: torch.Tensor, spec: ArchSpec) -> None:
    params = dict(layer.named_parameters())
    for name, value in folded(params, t, spec).items():
        params[name].copy_(value)


def compensate(model: nn.Module, plan: Plan, batches: Sequence[Batch], targets: dict[int, list[torch.Tensor]],
               config: Compensation) -> list[dict[str, Any]]:
    """Fit and fold every interface of ``plan`` into ``model`` (already pruned by the plan), bottom-up."""
    spec = spec_for(model)
    check_supported(spec)
    found, notes = interfaces(plan)
    layers = get_layers(model)
    records = [{"note": note} for note in notes]
    for interface in found:
        t, record = fit_interface(model, None, None, interface, batches, targets[interface.target], config, spec)
        fold_in_place(layers[interface.position], t, spec)
        records.append(record)
    return records


def compensated_stack(model: nn.Module, plan: Plan, stack: list[nn.Module], batches: Sequence[Batch],
                      targets: dict[int, list[torch.Tensor]], config: Compensation) -> list[nn.Module]:
    """The candidate ``stack`` (the plan's kept layers as modules) with every interface's map applied as a
    :class:`~depthprune.engine.merged.PatchedLayer`: the model itself is never written (used to rank plans)."""
    from .engine.merged import PatchedLayer, layer_params

    spec = spec_for(model)
    check_supported(spec)
    stack = list(stack)
    all_lists = per_layer_config_values(model.config, spec)
    per_layer = {name: [values[i] for i in plan.kept] for name, values in all_lists.items()}
    for interface in interfaces(plan)[0]:
        t, _ = fit_interface(model, stack, per_layer, interface, batches, targets[interface.target], config, spec)
        overrides = folded(layer_params(stack[interface.position]), t, spec)
        stack[interface.position] = PatchedLayer(stack[interface.position], overrides)
    return stack
