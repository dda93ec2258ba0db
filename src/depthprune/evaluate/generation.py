"""``--eval gen``: how far a pruned model drifts when it writes, not only when it is teacher-forced.

KL and top-1 are measured with the dense model's text as context at every position; a model that is close
there can still drift once it feeds on its own tokens. So N held-out prompts are continued greedily for a
fixed number of tokens by the dense (reference) model and by the model measured, and compared:

* ``gen_prefix``: mean number of leading new tokens identical to the dense continuation (0 to ``new_tokens``);
* ``gen_f1``: mean token F1 between the two continuations (bags of token ids), which credits a continuation
  that says the same things after a first difference.

Both per held-out text (``gen_f1/code``) and as their mean. The dense continuations are generated once per
evaluation and kept, so every model of a comparison is judged against the same ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.calibration import Calibration, domain_windows, tokenizer_key
from ..errors import InputError
from .distributions import DivergenceError
from .reference import reference_is_input, release_memory

METRICS = ("gen_prefix", "gen_f1")
NO_REFERENCE = ("--eval gen compares continuations with the dense (reference) model's, and none is known here: "
                "pass --reference DENSE (the model this one was made from)")


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_f1(a: list[int], b: list[int]) -> float:
    """F1 of the two bags of tokens (SQuAD's token F1 on ids)."""
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


@torch.inference_mode()
def continue_greedily(model: nn.Module, prompts: Calibration, new_tokens: int, batch_size: int = 16
                      ) -> list[list[int]]:
    """Exactly ``new_tokens`` greedy tokens after each prompt (end-of-text does not stop it: every continuation
    has the same length), KV-cached."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    pad = getattr(model.config, "pad_token_id", None)
    eos = getattr(model.config, "eos_token_id", None)
    for ids, mask in prompts.batches(batch_size):
        generated = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                   pad_token_id=pad if pad is not None else (eos if isinstance(eos, int) else 0))
        out.extend(generated[:, ids.shape[1]:].tolist())
    return out


@dataclass
class GenerationResult:
    gen_prefix: float
    gen_f1: float
    prompts: int
    new_tokens: int
    domains: dict[str, dict[str, float]] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        return {**{name: getattr(self, name) for name in METRICS},
                **{f"{name}/{d}": v[name] for name in METRICS for d, v in self.domains.items()}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(prompts: Calibration, got: list[list[int]], want: list[list[int]]) -> GenerationResult:
    """Each text's mean matching prefix and token F1, and their means (one weight per text)."""
    domains = {}
    for name, lo, hi in prompts.domains():
        pairs = list(zip(got[lo:hi], want[lo:hi]))
        domains[name] = {"gen_prefix": sum(matching_prefix(a, b) for a, b in pairs) / len(pairs),
                         "gen_f1": sum(token_f1(a, b) for a, b in pairs) / len(pairs)}
    mean = {m: sum(d[m] for d in domains.values()) / len(domains) for m in METRICS}
    return GenerationResult(mean["gen_prefix"], mean["gen_f1"], len(got), len(got[0]) if got else 0,
                            {} if list(domains) == [""] else domains)


@dataclass
class GenerationSpec:
    """Greedy continuations of ``prompts`` held-out prompts per text (the first ``prompt_len`` tokens of
    consecutive windows of each text), ``new_tokens`` long, compared with the reference model's."""

    texts: dict[str, str]
    prompts: int = 8
    prompt_len: int = 32
    new_tokens: int = 32
    batch_size: int = 16
    reference: str | None = None

    def check(self) -> None:
        if min(self.prompts, self.new_tokens, self.batch_size) < 1 or self.prompt_len < 2:
            raise InputError("--eval gen needs at least 1 prompt of at least 2 tokens and 1 new token")

    def windows(self, tokenizer: Any) -> Calibration:
        cache = self.__dict__.setdefault("_prompts", {})
        key = tokenizer_key(tokenizer)
        if key not in cache:
            cache[key] = domain_windows(tokenizer, self.texts, seq_len=self.prompt_len, max_windows=self.prompts)
        return cache[key]

    def prepare(self, input_source: str, input_path: str | None, *, first_is_input: bool,
                open_reference: Any) -> None:
        """Generate the reference's continuations now when it is another model than the input (opened with
        ``open_reference(source)``, then freed), else let the first model measured (the input) give them."""
        if "_reference" in self.__dict__:
            return
        if reference_is_input(self.reference, input_source, input_path, first_is_input, NO_REFERENCE):
            self.__dict__["_adopt_next"] = True
            return
        opened = open_reference(self.reference)
        self.adopt(opened.model, opened.tokenizer)
        del opened
        release_memory()

    def adopt(self, model: nn.Module, tokenizer: Any) -> None:
        """The reference (dense) model's continuations, kept for every model measured after."""
        self.__dict__["_reference"] = continue_greedily(model, self.windows(tokenizer), self.new_tokens,
                                                        self.batch_size)
        self.__dict__.pop("_adopt_next", None)

    def run(self, model: nn.Module, tokenizer: Any) -> GenerationResult:
        if "_reference" not in self.__dict__:
            if not self.__dict__.get("_adopt_next"):
                raise DivergenceError(NO_REFERENCE)
            self.adopt(model, tokenizer)
        prompts = self.windows(tokenizer)
        got = continue_greedily(model, prompts, self.new_tokens, self.batch_size)
        return compare(prompts, got, self.__dict__["_reference"])


__all__ = ["GenerationResult", "GenerationSpec", "METRICS", "compare", "continue_greedily", "matching_prefix",
           "token_f1"]
