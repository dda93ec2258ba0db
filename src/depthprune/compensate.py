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

Gaps are fitted bottom-up, each on the model as pruned and compensated so far.

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

from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import require_finite_fields
from .errors import InputError
from .models.arch import ArchSpec, get_layers, get_path, per_layer_config_values, spec_for, temporary_layer_stack
from .models.forward import Batch, layer_hooks, run_decoder
from .plan import Plan

FITS = ("linear", "cosine", "kl")
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
    kl_steps: int = 150
    kl_lr: float = 1e-4
    kl_windows: int = 32
    kl_batch: int = 4
    seed: int = 4321

    def validate(self) -> "Compensation":
        require_finite_fields(self)
        if self.fit not in FITS:
            raise InputError(f"unknown compensation {self.fit!r}: use one of {', '.join(FITS)}")
        if self.tokens < 1:
            raise InputError(f"--compensate-tokens must be at least 1, got {self.tokens}")
        if self.ridge < 0:
            raise InputError(f"--ridge must be 0 or more, got {self.ridge}")
        if min(self.steps, self.kl_steps) < 0 or min(self.lr, self.kl_lr) <= 0:
            raise InputError("compensation steps must be 0 or more and learning rates positive")
        if min(self.refine_tokens, self.kl_windows, self.kl_batch) < 1:
            raise InputError("compensation token, window and batch counts must be positive")
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
    """Every supported family can carry a compensation (a full map, or a rotation and scale); kept as the one
    place to refuse a family that could not."""
    if spec.post_mlp_norm is not None and not spec.projections.get("down"):
        raise InputError(f"compensation needs a down projection to fold into; {spec.family} declares none")


def fold_kind(spec: ArchSpec) -> str:
    return "qd" if spec.post_mlp_norm is not None else "full"


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
def capture_targets(model: nn.Module, batches: Sequence[Batch], indices: set[int]) -> dict[Any, list[torch.Tensor]]:
    """The original model's hidden state after each layer in ``indices``, per batch (on the CPU), and its final
    states (after the final norm) under the key ``"final"``: the teacher of the ``kl`` fit."""
    wanted = sorted(indices)
    layers = get_layers(model)
    out: dict[Any, list[torch.Tensor]] = {i: [] for i in wanted}
    out["final"] = []
    with layer_hooks([layers[i] for i in wanted], indices=wanted, post=lambda i, h: out[i].append(h.float().cpu())):
        for ids, mask in batches:
            out["final"].append(run_decoder(model, ids, mask).cpu())
    return out


# ---------------------------------------------------------------- where M is read and where T is folded


def _base(layer: nn.Module) -> nn.Module:
    from .engine.merged import base_module

    return base_module(layer)


def _output_module(layer: nn.Module, spec: ArchSpec) -> nn.Module:
    """The module whose output is the MLP's contribution to the residual stream."""
    return get_path(_base(layer), spec.post_mlp_norm or spec.down_proj)


def _nearest_qd(a: torch.Tensor, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal Q and diagonal D (as a vector) minimising ||A - Q diag(D)||_F, by alternating exact steps:
    for fixed D, Q is the orthogonal Procrustes solution of A diag(D); for fixed Q, D = diag(Q^T A)."""
    d = torch.diagonal(a).clone()
    for _ in range(iterations):
        u, _, vh = torch.linalg.svd(a * d.unsqueeze(0))
        q = u @ vh
        d = torch.diagonal(q.T @ a).clone()
    return q, d


def folded(params: dict[str, torch.Tensor], t: torch.Tensor, spec: ArchSpec) -> tuple[dict[str, torch.Tensor],
                                                                                         dict[str, float]]:
    """A layer's parameters (named as the layer holds them) that change when T is folded in, and what the fold
    lost (``qd``: the relative distance between ``diag(g) T`` and the Q D folded instead; 0 for ``full``)."""
    t = t.double()
    down = {name: params[name].detach() for name in (f"{spec.down_proj}.weight", f"{spec.down_proj}.bias")
            if params.get(name) is not None}
    if spec.post_mlp_norm is None:
        rotate, extra, lost = t, {}, 0.0
    else:
        gain_name = f"{spec.post_mlp_norm}.weight"
        gain = params[gain_name].detach().double().cpu() + spec.norm_gain_offset
        a = gain.unsqueeze(1) * t.cpu()
        rotate, scale = _nearest_qd(a)
        lost = float((a - rotate * scale.unsqueeze(0)).norm() / a.norm())
        extra = {gain_name: (scale - spec.norm_gain_offset).to(params[gain_name].dtype)}
    out = dict(extra)
    for name, value in down.items():
        r = rotate.to(value.device)
        if name.endswith(".bias"):
            new = value.double() @ r
        else:
            new = value.double() @ r if spec.conv1d else r.T @ value.double()
        out[name] = new.to(value.dtype)
    return out, {"fold": fold_kind(spec), "fold_error": lost}


@torch.no_grad()
def fold_in_place(layer: nn.Module, t: torch.Tensor, spec: ArchSpec) -> dict[str, float]:
    params = dict(layer.named_parameters())
    changes, record = folded(params, t, spec)
    for name, value in changes.items():
        params[name].copy_(value.to(params[name].device))
    return record


# ---------------------------------------------------------------- the least-squares fit


class _Stop(Exception):
    """Raised after the layer being fitted: nothing above it needs to run."""


@contextmanager
def _stack(model: nn.Module, stack: list[nn.Module] | None, per_layer: dict[str, list] | None) -> Iterator[None]:
    if stack is None:
        yield
    else:
        with temporary_layer_stack(model, stack, per_layer or {}):
            yield


@torch.inference_mode()
def _layer_split(model: nn.Module, stack: list[nn.Module] | None, per_layer: dict[str, list] | None, position: int,
                 batches: Sequence[Batch], spec: ArchSpec):
    """Per batch: the kept layer's MLP output M and the rest of its output Y (valid tokens only, float64)."""
    layer = stack[position] if stack is not None else get_layers(model)[position]
    seen: dict[str, torch.Tensor] = {}
    hook = _output_module(layer, spec).register_forward_hook(lambda m, a, o: seen.__setitem__("m", o))

    def stop(i: int, h: torch.Tensor) -> None:
        seen["out"] = h
        raise _Stop

    try:
        for ids, mask in batches:
            with layer_hooks([layer], post=stop), _stack(model, stack, per_layer):
                try:
                    run_decoder(model, ids, mask)
                except _Stop:
                    pass
            keep = mask.bool()
            m = seen["m"].reshape(mask.shape + (-1,))[keep].double()
            yield m, seen["out"][keep].double() - m, keep
    finally:
        hook.remove()


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
              "tokens": tokens, "fit": config.fit,
              "residual_before": _residual(torch.eye(len(a), dtype=a.dtype), a, b, c),
              "residual_linear": _residual(t, a, b, c)}
    if config.fit == "cosine" and config.steps > 0:
        t = _refine_cosine(t, sample, config)
        record["refine_tokens"] = sum(len(s[0]) for s in sample)
    record["residual_after"] = _residual(t, a, b, c)
    return t, record


# ---------------------------------------------------------------- the end-to-end (kl) fit


class _Maps:
    """A trainable map per interface, applied by forward hooks on top of the folds already in place and starting
    as "no change": a full T on the MLP output, or (``qd``) a rotation Q of the down projection's output plus the
    norm's gain, the only forms that fold."""

    def __init__(self, layers: list[nn.Module], spec: ArchSpec):
        self.spec, self.layers = spec, layers
        self.qd = spec.post_mlp_norm is not None
        self.maps: list[nn.Module | nn.Parameter] = []
        self.gains: list[nn.Parameter] = []
        self.params: list[nn.Parameter] = []
        for layer in layers:
            device = next(_base(layer).parameters()).device
            d = get_path(_base(layer), spec.down_proj).weight.shape[1 if spec.conv1d else 0]
            if self.qd:
                rotation = nn.Linear(d, d, bias=False).to(device)
                torch.nn.utils.parametrizations.orthogonal(rotation)
                with torch.no_grad():
                    rotation.weight = torch.eye(d, device=device)
                gain = nn.Parameter(_params_of(layer)[f"{spec.post_mlp_norm}.weight"].detach().float().clone())
                self.maps.append(rotation)
                self.gains.append(gain)
                self.params += [*rotation.parameters(), gain]
            else:
                t = nn.Parameter(torch.eye(d, device=device))
                self.maps.append(t)
                self.params.append(t)

    @contextmanager
    def applied(self) -> Iterator[None]:
        offset = self.spec.norm_gain_offset
        with ExitStack() as stack:
            for i, layer in enumerate(self.layers):
                base = _base(layer)
                if self.qd:
                    down = get_path(base, self.spec.down_proj)
                    handle = down.register_forward_hook(lambda m, a, o, r=self.maps[i]: r(o))
                    stack.callback(handle.remove)
                    norm = get_path(base, self.spec.post_mlp_norm)
                    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))

                    def rescaled(m, args, out, g=self.gains[i], eps=eps):
                        x = args[0].float()
                        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (g + offset)).type_as(out)

                    handle = norm.register_forward_hook(rescaled)
                    stack.callback(handle.remove)
                else:
                    handle = _output_module(layer, self.spec).register_forward_hook(
                        lambda m, a, o, t=self.maps[i]: o @ t)
                    stack.callback(handle.remove)
            yield

    def changes(self, layer: nn.Module, i: int) -> dict[str, torch.Tensor]:
        """The parameter changes that fold trained map ``i`` into ``layer`` exactly."""
        if not self.qd:
            return folded(_params_of(layer), self.maps[i].detach().double(), self.spec)[0]
        q = self.maps[i].weight.detach().T.double()
        params = _params_of(layer)
        out = {f"{self.spec.post_mlp_norm}.weight": self.gains[i].detach().to(
            params[f"{self.spec.post_mlp_norm}.weight"].dtype)}
        for name in (f"{self.spec.down_proj}.weight", f"{self.spec.down_proj}.bias"):
            if params.get(name) is not None:
                value = params[name].detach().double()
                r = q.to(value.device)
                new = value @ r if name.endswith(".bias") else r.T @ value
                out[name] = new.to(params[name].dtype)
        return out


def _train_end_to_end(model: nn.Module, stack: list[nn.Module] | None, per_layer: dict[str, list] | None,
                      layers: list[nn.Module], batches: Sequence[Batch], teacher: list[torch.Tensor],
                      config: Compensation, spec: ArchSpec) -> tuple[_Maps, dict[str, Any]]:
    """Train a map per interface together on KL(original || pruned) next-token distributions (model frozen)."""
    from .evaluate.perplexity import logits_from_hidden

    maps = _Maps(layers, spec)
    windows = [(ids[r : r + 1], mask[r : r + 1], teacher[b][r : r + 1])
               for b, (ids, mask) in enumerate(batches) for r in range(ids.shape[0])][: config.kl_windows]

    def kl(pick: Sequence[int]) -> torch.Tensor:
        ids = torch.cat([windows[i][0] for i in pick])
        mask = torch.cat([windows[i][1] for i in pick])
        hidden = run_decoder(model, ids, mask)
        keep = mask[:, :-1].bool()
        student = F.log_softmax(logits_from_hidden(model, hidden[:, :-1][keep]).float(), -1)
        with torch.no_grad():
            final = torch.cat([windows[i][2] for i in pick]).to(hidden.device)
            dense = F.log_softmax(logits_from_hidden(model, final[:, :-1][keep]).float(), -1)
        return F.kl_div(student, dense, log_target=True, reduction="batchmean")

    def mean_kl() -> float:
        with torch.no_grad():
            parts = [range(i, min(i + config.kl_batch, len(windows))) for i in range(0, len(windows), config.kl_batch)]
            return sum(float(kl(part)) * len(part) for part in parts) / len(windows)

    flags = {p: p.requires_grad for p in model.parameters()}
    optim = torch.optim.Adam(maps.params, lr=config.kl_lr)
    generator = torch.Generator().manual_seed(config.seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with maps.applied(), _stack(model, stack, per_layer):
            before = mean_kl()
            with torch.enable_grad():
                for _ in range(config.kl_steps):
                    loss = kl(torch.randperm(len(windows), generator=generator)[: config.kl_batch].tolist())
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
            after = mean_kl()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return maps, {"kl_windows": len(windows), "kl_steps": config.kl_steps, "kl_before": before, "kl_after": after}


def _params_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    from .engine.merged import layer_params

    return layer_params(layer)


# ---------------------------------------------------------------- whole plans


def _fit_all(model: nn.Module, plan: Plan, stack: list[nn.Module] | None, per_layer: dict[str, list] | None,
             batches: Sequence[Batch], targets: dict[Any, list[torch.Tensor]], config: Compensation,
             install) -> tuple[list[dict[str, Any]], list[nn.Module] | None]:
    """Fit every interface bottom-up, folding each as it is fitted (``install(position, changes, stack)`` puts
    the changes in place and returns the stack); for ``kl``, then train a map per interface on top of those folds
    end to end and fold the trained maps too."""
    spec = spec_for(model)
    check_supported(spec)
    found, notes = interfaces(plan)
    records: list[dict[str, Any]] = [{"note": note} for note in notes]
    current = stack

    def layer_at(position: int) -> nn.Module:
        return (current if current is not None else list(get_layers(model)))[position]

    for interface in found:
        t, record = fit_interface(model, current, per_layer, interface, batches, targets[interface.target], config,
                                  spec)
        changes, fold = folded(_params_of(layer_at(interface.position)), t, spec)
        current = install(interface.position, changes, current)
        records.append({**record, **fold})
    if config.fit == "kl" and found:
        maps, summary = _train_end_to_end(model, current, per_layer, [layer_at(i.position) for i in found], batches,
                                          targets["final"], config, spec)
        for k, interface in enumerate(found):
            current = install(interface.position, maps.changes(layer_at(interface.position), k), current)
        records.append({"end_to_end": summary})
    return records, current


def compensate(model: nn.Module, plan: Plan, batches: Sequence[Batch], targets: dict[Any, list[torch.Tensor]],
               config: Compensation) -> list[dict[str, Any]]:
    """Fit and fold every interface of ``plan`` into ``model`` (already pruned by the plan), bottom-up."""
    layers = get_layers(model)

    @torch.no_grad()
    def install(position: int, changes: dict[str, torch.Tensor], stack: None) -> None:
        params = dict(layers[position].named_parameters())
        for name, value in changes.items():
            params[name].copy_(value.to(params[name].device))

    return _fit_all(model, plan, None, None, batches, targets, config, install)[0]


def compensated_stack(model: nn.Module, plan: Plan, stack: list[nn.Module], batches: Sequence[Batch],
                      targets: dict[Any, list[torch.Tensor]], config: Compensation) -> list[nn.Module]:
    """The candidate ``stack`` (the plan's kept layers as modules) with every interface's map applied as a
    :class:`~depthprune.engine.merged.PatchedLayer`: the model itself is never written (used to rank plans)."""
    from .engine.merged import PatchedLayer

    spec = spec_for(model)
    all_lists = per_layer_config_values(model.config, spec)
    per_layer = {name: [values[i] for i in plan.kept] for name, values in all_lists.items()}

    def install(position: int, changes: dict[str, torch.Tensor], current: list[nn.Module]) -> list[nn.Module]:
        current = list(current)
        current[position] = PatchedLayer(current[position], changes)
        return current

    return _fit_all(model, plan, list(stack), per_layer, batches, targets, config, install)[1]
