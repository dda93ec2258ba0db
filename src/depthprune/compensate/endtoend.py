"""The ``kl`` fit: every interface's map trained together, end to end, on what the model outputs.

After the linear fits, one trainable map per interface (starting as "no change", applied by forward hooks on
top of the folds already in place) is trained with Adam, every model weight frozen, on KL(original || pruned)
next-token distributions over calibration windows. It needs gradients through the layers above each gap, so
the model must be in memory.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.merged import base_module, layer_params
from ..evaluate.perplexity import logits_from_hidden
from ..models.arch import ArchSpec, get_path
from ..models.mutate import temporary_layer_stack
from ..models.forward import Batch, run_decoder
from ..fit_settings import Compensation, KLSettings
from .fold import folded, output_module
from .registry import Changes, Fit, Training, register_fit


class Maps:
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
            device = next(base_module(layer).parameters()).device
            d = get_path(base_module(layer), spec.down_proj).weight.shape[1 if spec.conv1d else 0]
            if self.qd:
                rotation = nn.Linear(d, d, bias=False).to(device)
                torch.nn.utils.parametrizations.orthogonal(rotation)
                with torch.no_grad():
                    rotation.weight = torch.eye(d, device=device)
                gain = nn.Parameter(layer_params(layer)[f"{spec.post_mlp_norm}.weight"].detach().float().clone())
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
                base = base_module(layer)
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
                    handle = output_module(layer, self.spec).register_forward_hook(
                        lambda m, a, o, t=self.maps[i]: o @ t)
                    stack.callback(handle.remove)
            yield

    def changes(self, layer: nn.Module, i: int) -> dict[str, torch.Tensor]:
        """The parameter changes that fold trained map ``i`` into ``layer`` exactly."""
        if not self.qd:
            return folded(layer_params(layer), self.maps[i].detach().double(), self.spec)[0]
        q = self.maps[i].weight.detach().T.double()
        params = layer_params(layer)
        out = {f"{self.spec.post_mlp_norm}.weight": self.gains[i].detach().to(
            params[f"{self.spec.post_mlp_norm}.weight"].dtype)}
        for name in (f"{self.spec.down_proj}.weight", f"{self.spec.down_proj}.bias"):
            if params.get(name) is not None:
                value = params[name].detach().double()
                r = q.to(value.device)
                new = value @ r if name.endswith(".bias") else r.T @ value
                out[name] = new.to(params[name].dtype)
        return out


def train_end_to_end(model: nn.Module, stack: list[nn.Module], per_layer: dict[str, list],
                      layers: list[nn.Module], batches: Sequence[Batch], teacher: list[torch.Tensor],
                      config: Compensation, spec: ArchSpec) -> tuple[Maps, dict[str, Any]]:
    """Train a map per interface together on KL(original || pruned) next-token distributions (model frozen)."""
    maps, options = Maps(layers, spec), config.kl
    windows = [(ids[r : r + 1], mask[r : r + 1], teacher[b][r : r + 1])
               for b, (ids, mask) in enumerate(batches) for r in range(ids.shape[0])][: options.windows]

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
            parts = [range(i, min(i + options.batch, len(windows))) for i in range(0, len(windows), options.batch)]
            return sum(float(kl(part)) * len(part) for part in parts) / len(windows)

    flags = {p: p.requires_grad for p in model.parameters()}
    optim = torch.optim.Adam(maps.params, lr=options.lr)
    generator = torch.Generator().manual_seed(config.seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with maps.applied(), temporary_layer_stack(model, stack, per_layer):
            before = mean_kl()
            with torch.enable_grad():
                for _ in range(options.steps):
                    loss = kl(torch.randperm(len(windows), generator=generator)[: options.batch].tolist())
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
            after = mean_kl()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return maps, {"kl_windows": len(windows), "kl_steps": options.steps, "kl_before": before, "kl_after": after}


def train(training: Training) -> tuple[Changes, str, dict]:
    """The ``kl`` fit's training step: every map trained together, each then folded into its layer."""
    backend, stack, found = training.backend, training.stack, training.found
    per_layer = {name: [values[i] for i in training.plan.kept] for name, values in backend.per_layer_config().items()}
    maps, summary = train_end_to_end(backend.model, stack, per_layer, [stack[i.position] for i in found],
                                     list(training.walker.batches), training.teacher, training.config, backend.spec)
    return {i.position: maps.changes(stack[i.position], k) for k, i in enumerate(found)}, "end_to_end", summary


KL = register_fit(Fit("kl", "linear, then all maps trained together on the original model's next-token "
                      "distributions", options=KLSettings,
                      train=train))
