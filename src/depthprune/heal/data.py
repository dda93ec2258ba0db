"""Healing data: alpaca records or plain text, tokenized, split, and padded into batches.

Data, chosen by what ``data`` names:

* a shipped text by name (``general``: fiction, encyclopedic prose and code a
  block of each in turn; ``fiction``, ``encyclopedic``, ``code``, ``default``):
  plain language-modelling (or distillation) loss on its blocks;
* ``alpaca-cleaned`` (= ``yahma/alpaca-cleaned``) or another hub id: read with
  ``datasets.load_dataset`` (network; cached in the usual datasets cache);
* a local ``.json`` (a list of records) or ``.jsonl`` file in alpaca layout
  (``instruction``, optional ``input``, ``output``), formatted with the
  Stanford Alpaca / alpaca-lora prompt template;
* ``.txt`` files: plain language-modelling loss on consecutive blocks of
  ``cutoff_len`` tokens (the tokenizer's BOS, if any, starts each block).

Loss on alpaca records is over the *full* sequence (prompt and response) by
default, as alpaca-lora's ``train_on_inputs=True`` that LLM-Pruner, SLM and
Shortened-LLaMA run with: healing aims to restore general language modelling,
not to teach instruction following. ``train_on="response"`` masks the prompt.
"""

from __future__ import annotations

import json
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..checks import check_name_lengths
from ..data.calibration import named_texts, read_jsonl, special_prefix
from ..hub_access import hub_offline, hub_reachable
from .config import HealConfig, HealDataError

ALPACA_HUB = {"alpaca-cleaned": "yahma/alpaca-cleaned", "yahma/alpaca-cleaned": "yahma/alpaca-cleaned"}
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt (as alpaca-lora's template), up to and including '### Response:\\n'."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class HealData:
    """Tokenized training and validation items (``input_ids`` and ``labels``, -100 = no loss)."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    kind: str
    description: dict[str, Any] = field(default_factory=dict)


def _check_records(records: Sequence[Any], where: str) -> list[dict[str, str]]:
    if not records:
        raise HealDataError(f"{where} holds no records")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) \
                or not isinstance(rec.get("output"), str):
            raise HealDataError(
                f"record {i} of {where} is not in alpaca layout: each record needs string fields "
                "'instruction' and 'output' (and optionally 'input')"
            )
        inp = rec.get("input") or ""
        out.append({"instruction": rec["instruction"], "input": inp if isinstance(inp, str) else str(inp),
                    "output": rec["output"]})
    return out


def read_alpaca_file(path: Path) -> list[dict[str, str]]:
    """Records of a local alpaca .json (a list) or .jsonl (one object per line) file."""
    try:
        text = path.read_text(encoding="utf-8")
        records = [r for _, r in read_jsonl(text)] if path.suffix == ".jsonl" else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HealDataError(f"cannot read {path} as alpaca JSON ({err}); use UTF-8 .json (a list of "
                            "records) or .jsonl (one record per line)") from err
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise HealDataError(f"{path} must hold a JSON list of alpaca records")
    return _check_records(records, str(path))


def read_alpaca_hub(name: str, max_items: int | None = None) -> list[dict[str, str]]:
    """Records of an alpaca-layout hub dataset (train split) via ``datasets.load_dataset``."""
    import datasets

    repo = ALPACA_HUB.get(name, name)
    try:
        with hub_offline() if not hub_reachable() else nullcontext():
            ds = datasets.load_dataset(repo, split="train")
    except Exception as err:  # datasets raises many types when offline or the name is wrong
        raise HealDataError(
            f"could not load dataset {repo!r} ({type(err).__name__}: {err}). Offline? Pass a local "
            ".json/.jsonl file in alpaca layout or a .txt file"
        ) from err
    if max_items is not None:
        ds = ds.select(range(min(max_items, len(ds))))
    return _check_records(list(ds), repo)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise HealDataError(f"cannot read {path} as UTF-8 text ({err})") from err


def tokenize_alpaca(records: Iterable[dict[str, str]], tokenizer: Any, cutoff_len: int,
                    train_on: str = "full") -> list[dict[str, list[int]]]:
    """alpaca-lora's tokenization: prompt + output, truncated to ``cutoff_len``, EOS appended if it fits."""
    eos = tokenizer.eos_token_id

    def encode(text: str, add_eos: bool) -> list[int]:
        ids = list(tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"])
        if add_eos and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    items = []
    for rec in records:
        prompt = alpaca_prompt(rec["instruction"], rec["input"])
        ids = encode(prompt + rec["output"], add_eos=True)
        labels = list(ids)
        if train_on == "response":
            n_prompt = len(encode(prompt, add_eos=False))
            labels[:n_prompt] = [-100] * min(n_prompt, len(labels))
        if any(label != -100 for label in labels[1:]):
            items.append({"input_ids": ids, "labels": labels})
    return items


def text_blocks(texts: Sequence[str], tokenizer: Any, cutoff_len: int) -> list[dict[str, list[int]]]:
    """Consecutive ``cutoff_len``-token blocks of the joined texts (BOS, if the tokenizer adds one, first)."""
    prefix = special_prefix(tokenizer)
    body = cutoff_len - len(prefix)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sequence length is longer than.*")
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    blocks = [prefix + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def interleave(parts: list[list[dict[str, list[int]]]]) -> list[dict[str, list[int]]]:
    """One block of each text in turn: any first N blocks (``--max-items``) hold the texts in equal shares."""
    out = []
    for k in range(max((len(p) for p in parts), default=0)):
        out.extend(p[k] for p in parts if k < len(p))
    return out


def _split(items: list[dict[str, list[int]]], val_size: float, seed: int, where: str):
    n = len(items)
    n_val = 0 if val_size == 0 else (max(1, round(val_size * n)) if val_size < 1 else int(val_size))
    if n - n_val < 1:
        raise HealDataError(
            f"{where} gives {n} training items, too few for a validation split of {n_val}; "
            "use more data, a smaller val_size, or val_size=0"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    return train, val


def data_paths(data: str | Path | Sequence[str | Path]) -> list[Path] | None:
    """The local files ``data`` names, or None when it names a hub dataset."""
    if isinstance(data, (list, tuple)):
        return [Path(d).expanduser() for d in data]
    path = Path(data).expanduser()
    if isinstance(data, Path) or path.suffix in TEXT_SUFFIXES + JSON_SUFFIXES or path.exists() \
            or str(data).startswith((".", "/", "~")):
        return [path]
    return None


def _check_hub_name(data: Any) -> None:
    if str(data) not in ALPACA_HUB and str(data).count("/") != 1:
        raise HealDataError(
            f"unknown healing data {data!r}: pass 'alpaca-cleaned', a hub id in alpaca layout, a local "
            ".json/.jsonl file in alpaca layout, or .txt files"
        )


def _local_kind(paths: list[Path]) -> str:
    """``alpaca`` or ``text`` for existing local files of one kind."""
    for p in paths:
        check_name_lengths(p, "--data")
        if not p.is_file():
            raise HealDataError(f"healing data file not found: {p}")
    suffixes = {p.suffix for p in paths}
    if suffixes <= set(JSON_SUFFIXES):
        return "alpaca"
    if not suffixes & set(JSON_SUFFIXES):
        return "text"
    raise HealDataError("do not mix alpaca .json/.jsonl files and plain text files in one run")


def check_heal_data(data: str | Path | Sequence[str | Path]) -> None:
    """Read and check what ``data`` names before any model is loaded: local files exist, alpaca files hold
    valid records, text files are UTF-8 with some text in them; a hub dataset has the shape of a name (whether
    it exists is only known when it downloads)."""
    if isinstance(data, str) and named_texts(data) is not None:
        return
    paths = data_paths(data)
    if paths is None:
        _check_hub_name(data)
        return
    kind = _local_kind(paths)
    for p in paths:
        if kind == "alpaca":
            read_alpaca_file(p)
        elif not _read_text_file(p).strip():
            raise HealDataError(f"{p} holds no text to train on")


def load_heal_data(data: str | Path | Sequence[str | Path], tokenizer: Any, config: HealConfig) -> HealData:
    """Read, format, tokenize and split ``data`` (see the module docstring for what it may name)."""
    named = named_texts(data) if isinstance(data, str) else None
    paths = data_paths(data) if named is None else []
    if named is not None:
        items = interleave([text_blocks([text], tokenizer, config.cutoff_len) for text in named])
        items = items[: config.max_items]
        kind, desc = "text", {"source": str(data), "blocks": len(items)}
    elif paths is None:
        _check_hub_name(data)
        records = read_alpaca_hub(str(data), config.max_items)
        items = tokenize_alpaca(records, tokenizer, config.cutoff_len, config.train_on)
        kind, desc = "alpaca", {"source": f"hub:{ALPACA_HUB.get(str(data), str(data))}", "records": len(records)}
    else:
        if _local_kind(paths) == "alpaca":
            records = [r for p in paths for r in read_alpaca_file(p)][: config.max_items]
            items = tokenize_alpaca(records, tokenizer, config.cutoff_len, config.train_on)
            kind, desc = "alpaca", {"source": [str(p) for p in paths], "records": len(records)}
        else:
            items = text_blocks([_read_text_file(p) for p in paths], tokenizer, config.cutoff_len)
            items = items[: config.max_items]
            kind, desc = "text", {"source": [str(p) for p in paths], "blocks": len(items)}
    if not items:
        raise HealDataError(
            f"{data} yields no training items of up to {config.cutoff_len} tokens; text must be longer "
            "than one block, alpaca records need a non-empty output"
        )
    train, val = _split(items, config.val_size, config.seed, str(data))
    desc.update(kind=kind, train_items=len(train), val_items=len(val), cutoff_len=config.cutoff_len,
                train_on=config.train_on if kind == "alpaca" else "full")
    return HealData(train, val, kind, desc)


class Items(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass
class PadCollator:
    """Right-pad to the longest item (a multiple of 8); padding is masked and never a target."""

    pad_id: int
    multiple_of: int = 8

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(it["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
