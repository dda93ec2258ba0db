"""Importance of width units: MLP intermediate channels and attention key/value groups.

A *unit* is what structured width pruning removes as a whole. Each unit owns
a slice of several weight matrices, and a unit's importance is summed over
all of them:

* MLP channel ``c``: row ``c`` of the producing projections (gate and up, or
  fc1) and column ``c`` of the consuming one (down, or fc2).
* Attention group ``g`` (GQA-aware): the rows of q for the query heads that
  share key/value head ``g``, the rows of k and v for head ``g``, and the
  columns of o that read those query heads. With plain multi-head attention a
  group is one head.

Scorers (all computed per weight element, then summed over the unit):

``magnitude``  ``sqrt(sum W^2)``: the L2 norm of the unit's weights; needs no data.
``wanda``      ``sum |W_ij| * ||X_j||_2`` (Sun et al., arXiv 2306.11695), with
               ``||X_j||`` the norm of input feature ``j`` of that matrix over
               every non-padding calibration token (collected with hooks). Wanda
               scores single weights; summing over the unit is the structured
               variant used by Wanda-sp/FLAP-style width pruning.
``taylor``     ``sum |W * dL/dW|`` (LLM-Pruner's element-wise first-order
               Taylor term), ``L`` = mean next-token loss over all calibration
               tokens; gradients are accumulated over batches first, so the
               score equals the one from a single full-batch backward pass.

Biases are not scored (they are small and follow their channel when pruned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..errors import InputError
from ..models.arch import ARCHITECTURES, ArchSpec, get_layers, get_path, model_device, spec_for
from ..models.forward import decoder_passes

Side = Literal["out", "in"]


class WidthError(InputError):
    pass


def check_mlp_supported(spec: ArchSpec) -> None:
    if spec.mlp_size_field is None:
        supported = sorted(a.family for a in ARCHITECTURES if a.mlp_size_field)
        raise WidthError(
            f"MLP width pruning is not implemented for {spec.family} (its MLP fuses gate and up). "
            f"Supported families: {', '.join(supported)}."
        )


def check_heads_supported(spec: ArchSpec) -> None:
    if not spec.head_pruning:
        supported = sorted(a.family for a in ARCHITECTURES if a.head_pruning)
        raise WidthError(
            f"attention-head pruning is not implemented for {spec.family}. Supported families: "
            f"{', '.join(supported)}. Use --ratio-heads 0 to prune only MLP channels."
        )


@dataclass(frozen=True)
class Share:
    """The slice of one weight matrix owned by the units of one kind.

    ``side="out"``: units index the matrix's output features (rows of an
    ``nn.Linear`` weight); ``side="in"``: its input features. Each unit owns
    ``unit_size`` consecutive features on that side.
    """

    module: nn.Module
    side: Side
    unit_size: int
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def axis(self) -> int:
        """The weight axis that indexes features on ``side`` (GPT-2's Conv1D stores W as (in, out))."""
        return int((self.side == "out") == self.transposed)

    @property
    def input_axis(self) -> int:
        return 0 if self.transposed else 1

    def per_unit(self, elementwise: torch.Tensor) -> torch.Tensor:
        """Sum an elementwise score (shaped like the weight) over each unit's slice."""
        features = elementwise.movedim(self.axis, 0)
        units = features.shape[0] // self.unit_size
        return features.reshape(units, -1).sum(dim=1)


def head_dim_of(model: nn.Module) -> int:
    spec = spec_for(model)
    attn = get_path(get_layers(model)[0], spec.attention)
    config = model.config
    return int(getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def mlp_shares(layer: nn.Module, spec: ArchSpec) -> list[Share]:
    check_mlp_supported(spec)
    proj = spec.projections
    producers = [proj[role] for role in ("gate", "up") if role in proj]
    return [Share(get_path(layer, p), "out", 1, spec.conv1d) for p in producers] + [
        Share(get_path(layer, spec.down_proj), "in", 1, spec.conv1d)
    ]


def head_shares(layer: nn.Module, spec: ArchSpec, config: object, head_dim: int) -> list[Share]:
    check_heads_supported(spec)
    proj = spec.projections
    group = config.num_attention_heads // config.num_key_value_heads
    return [
        Share(get_path(layer, proj["q"]), "out", group * head_dim, spec.conv1d),
        Share(get_path(layer, proj["k"]), "out", head_dim, spec.conv1d),
        Share(get_path(layer, proj["v"]), "out", head_dim, spec.conv1d),
        Share(get_path(layer, proj["o"]), "in", group * head_dim, spec.conv1d),
    ]


@dataclass
class UnitShares:
    """Per layer: the shares of its MLP channels and of its attention groups."""

    mlp: list[list[Share]]
    heads: list[list[Share]]

    def all_modules(self) -> list[nn.Module]:
        seen: dict[int, nn.Module] = {}
        for layer in self.mlp + self.heads:
            for share in layer:
                seen[id(share.module)] = share.module
        return list(seen.values())


def unit_shares(model: nn.Module, *, mlp: bool = True, heads: bool = True) -> UnitShares:
    spec = spec_for(model)
    layers = list(get_layers(model))
    hd = head_dim_of(model) if heads else 0
    return UnitShares(
        mlp=[mlp_shares(layer, spec) for layer in layers] if mlp else [],
        heads=[head_shares(layer, spec, model.config, hd) for layer in layers] if heads else [],
    )


@dataclass
class UnitScores:
    """One score per unit, per layer (``mlp[i][c]``, ``heads[i][g]``); high = important."""

    scorer: str
    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]


def _score(shares: UnitShares, elementwise: Callable[[Share], torch.Tensor],
           finish: Callable[[torch.Tensor], torch.Tensor], scorer: str) -> UnitScores:
    def layer_score(layer: list[Share]) -> torch.Tensor:
        total = sum(share.per_unit(elementwise(share).float()).cpu() for share in layer)
        return finish(total)

    return UnitScores(scorer, [layer_score(s) for s in shares.mlp], [layer_score(s) for s in shares.heads])


@torch.no_grad()
def magnitude_scores(model: nn.Module, shares: UnitShares) -> UnitScores:
    return _score(shares, lambda s: s.weight.detach().float().pow(2), torch.sqrt, "magnitude")


class _InputNorms:
    """Forward pre-hooks accumulating ``sum_tokens x_j^2`` for every input feature ``j`` of each module.

    Padding tokens are left out: ``mask`` is set before each batch.
    """

    def __init__(self, modules: list[nn.Module]):
        self.sumsq: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        x = x.reshape(-1, x.shape[-1])  # OPT flattens (batch, tokens) before its MLP
        if self.mask is not None:
            mask = self.mask.reshape(-1).to(x.device, x.dtype)
            if mask.numel() != x.shape[0]:
                raise WidthError(f"cannot match {x.shape[0]} activation rows to {mask.numel()} mask tokens")
            x = x * mask.unsqueeze(-1)
        sq = x.pow(2).sum(dim=0)
        key = id(module)
        self.sumsq[key] = self.sumsq[key] + sq if key in self.sumsq else sq

    def norm(self, module: nn.Module) -> torch.Tensor:
        return self.sumsq[id(module)].sqrt()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def wanda_scores(model: nn.Module, shares: UnitShares, calibration: Calibration, *,
                 batch_size: int = 4, progress: bool = True) -> UnitScores:
    """|W| times the L2 norm of each input feature, summed over the unit's weights."""
    norms = _InputNorms(shares.all_modules())
    try:
        for _ in decoder_passes(model, calibration, batch_size=batch_size, progress=progress,
                                desc="wanda activations", before=lambda ids, mask: setattr(norms, "mask", mask)):
            pass
    finally:
        norms.remove()

    def elementwise(share: Share) -> torch.Tensor:
        x = norms.norm(share.module).to(share.weight.device)
        shape = [1, 1]
        shape[share.input_axis] = -1
        return share.weight.detach().float().abs() * x.reshape(shape)

    return _score(shares, elementwise, lambda t: t, "wanda")


def _lm_loss_sum(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over valid (non-padding) targets."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def taylor_scores(model: nn.Module, shares: UnitShares, calibration: Calibration, *,
                  batch_size: int = 4, progress: bool = True) -> UnitScores:
    """|W * dL/dW| summed over the unit, L the mean next-token loss over the calibration tokens."""
    modules = shares.all_modules()
    weights = [m.weight for m in modules]
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = model_device(model)
    total_targets = int(calibration.attention_mask[:, 1:].sum())
    if total_targets == 0:
        raise WidthError("taylor scoring needs calibration windows with at least 2 tokens")
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        batches = list(calibration.batches(batch_size))
        with torch.enable_grad():
            for ids, mask in tqdm(batches, desc="taylor gradients", disable=not progress, unit="batch"):
                loss = _lm_loss_sum(model, ids.to(device), mask.to(device)) / total_targets
                loss.backward()
        grads = {id(w): w.grad.detach().float() for w in weights}
        return _score(shares, lambda s: (s.weight.detach().float() * grads[id(s.weight)]).abs(),
                      lambda t: t, "taylor")
    finally:
        for p, flag in saved_flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


SCORERS = ("magnitude", "wanda", "taylor")


def score_units(
    model: nn.Module,
    scorer: str,
    calibration: Calibration | None = None,
    *,
    mlp: bool = True,
    heads: bool = True,
    batch_size: int = 4,
    progress: bool = True,
) -> UnitScores:
    """Score every MLP channel and/or attention group of every layer with ``scorer``."""
    if scorer not in SCORERS:
        raise WidthError(f"unknown width scorer {scorer!r}: use one of {', '.join(SCORERS)}")
    shares = unit_shares(model, mlp=mlp, heads=heads)
    if scorer == "magnitude":
        return magnitude_scores(model, shares)
    if calibration is None:
        raise WidthError(f"the {scorer} scorer needs calibration windows (depthprune.calibration_windows)")
    fn = wanda_scores if scorer == "wanda" else taylor_scores
    return fn(model, shares, calibration, batch_size=batch_size, progress=progress)


__all__ = [
    "SCORERS",
    "Share",
    "UnitScores",
    "UnitShares",
    "WidthError",
    "head_dim_of",
    "score_units",
    "unit_shares",
]
