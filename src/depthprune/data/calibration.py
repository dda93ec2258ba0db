"""Calibration and evaluation text: where it comes from and how it becomes token windows.

Sources, by name:
  ``fiction|encyclopedic|code``  shipped calibration texts of three domains (no network; :mod:`.shipped`)
  ``heldout-fiction|heldout-encyclopedic|heldout-code``  shipped held-out texts of the same domains, from other
                                documents, for evaluation
  ``default``                   Pride and Prejudice, first 85% (shipped; ``default-heldout`` = ``heldout-fiction``)
  ``bookcorpus|pg19|c4|wikitext2|wikitext2-test|ptb``  hub datasets via ``datasets``
  ``path/to/file.txt|.jsonl``   local text (jsonl: a ``text`` field per line)

Windows carry the tokenizer's own default special prefix (``<bos>`` for Gemma,
nothing for Qwen or SmolLM2), inside the window length: a 128-token window is
128 tokens including BOS.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Collection

import torch

from ..checks import check_name_lengths
from ..errors import InputError
from .shipped import shipped, shipped_names


class CalibrationError(InputError):
    pass


@dataclass(frozen=True)
class HubText:
    """A public dataset read through ``datasets.load_dataset``."""

    path: str
    name: str | None
    split: str
    field: str = "text"
    streaming: bool = True
    data_files: str | None = None
    max_docs: int = 20_000


HUB_TEXTS: dict[str, HubText] = {
    "bookcorpus": HubText("bookcorpus/bookcorpus", None, "train"),
    "pg19": HubText("deepmind/pg19", None, "validation"),
    "c4": HubText("allenai/c4", "en", "validation"),
    "wikitext2": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "train", streaming=False),
    "wikitext2-test": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "test", streaming=False),
    "ptb": HubText("ptb-text-only/ptb_text_only", None, "test", field="sentence", streaming=False),
}


def default_text_path() -> Path:
    return shipped("default").path


def read_jsonl(text: str) -> list[tuple[int, Any]]:
    """(line number, value) of every non-empty line; a bad line's error gives its own line number."""
    values, offset = [], 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if line.strip():
            try:
                values.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise json.JSONDecodeError(err.msg, text, offset + err.pos) from None
        offset += len(line)
    return values


def _read_local(path: Path) -> str:
    if path.is_dir():
        raise CalibrationError(f"{path} is a directory; pass a .txt or .jsonl file")
    if not path.is_file():
        raise CalibrationError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            return text
        texts = []
        for number, value in read_jsonl(text):
            if not isinstance(value, dict) or not isinstance(value.get("text"), str):
                raise CalibrationError(f"{path}: line {number} is not an object with a string 'text' field; "
                                       "each line of a calibration .jsonl must be one")
            texts.append(value["text"])
        return "\n\n".join(texts)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationError(
            f"cannot read {path} as calibration text ({err}); use UTF-8 .txt or .jsonl with a 'text' field"
        ) from err


def read_hub_text(source: HubText, max_chars: int = 4_000_000) -> str:
    """Join documents of a hub dataset with blank lines until ``max_chars``."""
    import datasets

    kwargs: dict[str, Any] = {"split": source.split, "streaming": source.streaming}
    if source.data_files:
        kwargs["data_files"] = source.data_files
    try:
        ds = datasets.load_dataset(source.path, source.name, **kwargs)
    except Exception as err:  # datasets raises many types for offline / missing data
        raise CalibrationError(
            f"could not load dataset {source.path!r} ({type(err).__name__}: {err}). Offline? "
            "Pass a local .txt/.jsonl file or use the default text."
        ) from err
    parts, total = [], 0
    for i, row in enumerate(ds):
        text = row[source.field]
        if text and text.strip():
            parts.append(text)
            total += len(text)
        if total >= max_chars or i + 1 >= source.max_docs:
            break
    return "\n\n".join(parts)


def read_text(source: str | Path) -> tuple[str, str]:
    """Return (text, description) for a source name or file path."""
    text = shipped(source) if isinstance(source, str) else None
    if text is not None:
        return text.read(), text.describe()
    if isinstance(source, str) and source in HUB_TEXTS:
        hub = HUB_TEXTS[source]
        return read_hub_text(hub), f"hub:{hub.path}/{hub.name or ''}:{hub.split}"
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".md", ".text") or path.exists():
        return _read_local(path), f"file:{path}"
    raise CalibrationError(
        f"unknown text source {source!r}: use a shipped text ({', '.join(shipped_names())}), one of "
        f"{', '.join(HUB_TEXTS)}, "
        "or a path to a .txt/.jsonl file"
    )


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before text by default (BOS or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n <= 0 or with_special[n:] != plain:
        return []
    return list(with_special[:n])


@dataclass
class Calibration:
    """Token windows (``input_ids``, ``attention_mask``) plus where they came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def num_windows(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int):
        for start in range(0, self.num_windows, batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]

    def first(self, count: int) -> "Calibration":
        """The first ``count`` windows (a cheap, lower-fidelity sample of the same text)."""
        return Calibration(self.input_ids[:count], self.attention_mask[:count],
                           {**self.description, "windows_used": min(count, self.num_windows)})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.description)


@dataclass
class CalibrationSpec:
    """Where calibration comes from: sampled token windows, or a file of sentences (LaCo)."""

    source: str = "default"
    num_windows: int = 10
    seq_len: int = 128
    seed: int = 1234
    sentences_file: str | None = None

    def check(self) -> "CalibrationSpec":
        """What can be checked before a model is loaded: the numbers, and a local text read and judged (UTF-8,
        valid .jsonl, not empty, long enough for the windows asked for)."""
        if self.num_windows < 1:
            raise CalibrationError(f"--calib-samples must be at least 1, got {self.num_windows}")
        if self.seq_len < 2:
            raise CalibrationError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        text = check_text_source(self.source, "--calib")
        if self.sentences_file is not None:
            check_text_source(self.sentences_file, "--calib-sentences")
        elif text is not None:
            check_room(text, self.num_windows, self.seq_len)
        return self

    #: Windows held out of every fit, for ranking candidate plans (``--method auto``).
    HELDOUT_WINDOWS = 16

    def heldout(self, tokenizer: Any) -> "Calibration":
        """Windows of the same text disjoint from the planning windows, never used to fit anything."""
        planning = self.windows(tokenizer).description.get("slots", [])
        return self._cached(tokenizer, ("heldout",), lambda: sample_windows(
            tokenizer, self.source, num_windows=self.HELDOUT_WINDOWS, seq_len=self.seq_len, seed=self.seed + 1,
            exclude=planning))

    def fit_windows(self, tokenizer: Any, num_windows: int, seed: int) -> "Calibration":
        """Windows for fitting (compensation maps): any of the text except the held-out windows."""
        heldout = self.heldout(tokenizer).description["slots"]
        return self._cached(tokenizer, ("fit", num_windows, seed), lambda: sample_windows(
            tokenizer, self.source, num_windows=num_windows, seq_len=self.seq_len, seed=seed, exclude=heldout))

    def _cached(self, tokenizer: Any, what: tuple, make: Any) -> "Calibration":
        cache = self.__dict__.setdefault("_cache", {})
        key = (tokenizer_key(tokenizer), *what)
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def windows(self, tokenizer: Any) -> "Calibration":
        """The windows for ``tokenizer``; tokenized once per tokenizer and reused (e.g. by every bench row)."""
        if self.sentences_file is not None:
            return self._cached(tokenizer, ("sentences",), lambda: sentences_from_file(
                tokenizer, self.sentences_file, max_len=self.seq_len))
        return self._cached(tokenizer, ("windows",), lambda: sample_windows(
            tokenizer, self.source, num_windows=self.num_windows, seq_len=self.seq_len, seed=self.seed))


def tokenizer_key(tokenizer: Any) -> tuple:
    """Identifies a tokenizer's behaviour well enough to reuse windows made with an equal one."""
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None), len(tokenizer),
            tuple(special_prefix(tokenizer)))


NAMED_TEXTS = tuple(shipped_names())


def check_text_source(source: str | Path, option: str) -> str | None:
    """A named text or a readable file holding text; anything else is caught before loading the model.

    Returns the text, or None for a hub dataset (read only when it is used: it may need the network).
    """
    if str(source) in HUB_TEXTS:
        return None
    text = shipped(str(source))
    if text is not None:
        return text.read()
    path = Path(source).expanduser()
    check_name_lengths(path, option)
    if path.is_dir():
        raise CalibrationError(f"{option} {source} is a directory; pass a .txt or .jsonl file")
    if not path.is_file():
        raise CalibrationError(f"{option} {source!r} is neither a file nor a known text ({', '.join(NAMED_TEXTS)}, "
                               f"{', '.join(HUB_TEXTS)}); pass a .txt/.jsonl path")
    text = _read_local(path)
    if not text.strip():
        raise CalibrationError(f"{option} {source} holds no text; pass a file with some")
    return text


#: No tokenizer makes more than this many tokens of one UTF-8 byte, so a text of n bytes holds at most
#: ``MAX_TOKENS_PER_BYTE * n`` tokens: a bound to refuse impossible window counts before any tokenizer loads.
MAX_TOKENS_PER_BYTE = 2


def check_room(text: str, num_windows: int, seq_len: int) -> None:
    """Refuse ``num_windows`` windows of ``seq_len`` tokens that ``text`` cannot hold whatever the tokenizer
    (the exact count is known, and checked again, once the text is tokenized)."""
    most = MAX_TOKENS_PER_BYTE * len(text.encode("utf-8")) // max(1, seq_len - 2)
    if num_windows > most:
        raise CalibrationError(
            f"--calib-samples {num_windows}: the calibration text ({len(text.encode('utf-8'))} bytes) cannot hold "
            f"{num_windows} windows of {seq_len} tokens (at most {most} even at {MAX_TOKENS_PER_BYTE} tokens per "
            "byte); use fewer --calib-samples, a smaller --seq-len or a longer text")


def _tokenize_body(tokenizer: Any, text: str) -> list[int]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sequence length is longer than.*")
        return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class _Slots:
    """A text's tokens cut into consecutive window bodies, each to be led by the special prefix."""

    ids: list[int]
    prefix: list[int]
    seq_len: int
    source: str

    @classmethod
    def cut(cls, tokenizer: Any, source: str | Path, text: str | None, seq_len: int) -> "_Slots":
        text, desc = read_text(source) if text is None else (text, "inline text")
        prefix = special_prefix(tokenizer)
        if seq_len - len(prefix) < 1:
            raise CalibrationError(f"--seq-len {seq_len} leaves no room after the special prefix")
        slots = cls(_tokenize_body(tokenizer, text), prefix, seq_len, desc)
        if len(slots) == 0:
            raise CalibrationError(
                f"text has {len(slots.ids)} tokens, shorter than one {seq_len}-token window; "
                "use a longer text or a smaller --seq-len"
            )
        return slots

    @property
    def body_len(self) -> int:
        return self.seq_len - len(self.prefix)

    def __len__(self) -> int:
        return len(self.ids) // self.body_len

    def window(self, i: int) -> list[int]:
        return self.prefix + self.ids[i * self.body_len : (i + 1) * self.body_len]

    def description(self) -> dict[str, Any]:
        return {"source": self.source, "seq_len": self.seq_len, "special_prefix": self.prefix,
                "text_tokens": len(self.ids)}


def _stack(windows: list[list[int]]) -> Calibration:
    ids = torch.tensor(windows, dtype=torch.long)
    return Calibration(ids, torch.ones_like(ids))


def sample_windows(
    tokenizer: Any,
    source: str | Path = "default",
    *,
    num_windows: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    text: str | None = None,
    exclude: Collection[int] = (),
) -> Calibration:
    """``num_windows`` random non-overlapping windows of ``seq_len`` tokens (seeded).

    The text is cut into consecutive slots of ``seq_len`` tokens and
    ``num_windows`` slots are drawn without replacement, as ShortGPT's
    non-overlapping windows and SLM's random 128-token samples both require.
    Slots in ``exclude`` are never drawn (held-out windows stay held out); the
    slots drawn are recorded in the description.
    """
    if num_windows < 1 or seq_len < 2:
        raise CalibrationError("need at least 1 window of at least 2 tokens")
    slots = _Slots.cut(tokenizer, source, text, seq_len)
    free = [i for i in range(len(slots)) if i not in set(exclude)]
    if len(free) < num_windows:
        raise CalibrationError(
            f"calibration text holds only {len(free)} windows of {seq_len} tokens available but {num_windows} "
            "were requested; use a longer text, fewer windows or tokens, or a smaller --seq-len"
        )
    picked = sorted(random.Random(seed).sample(free, num_windows))
    cal = _stack([slots.window(i) for i in picked])
    cal.description = {**slots.description(), "num_windows": num_windows, "seed": seed, "slots": picked}
    return cal


def consecutive_windows(
    tokenizer: Any,
    source: str | Path,
    *,
    seq_len: int = 128,
    max_windows: int | None = None,
    text: str | None = None,
) -> Calibration:
    """Non-overlapping windows from the start of the text (the perplexity protocol)."""
    slots = _Slots.cut(tokenizer, source, text, seq_len)
    n = len(slots) if max_windows is None else min(len(slots), max_windows)
    cal = _stack([slots.window(i) for i in range(n)])
    cal.description = {**slots.description(), "num_windows": n}
    return cal


def sentences(tokenizer: Any, texts: list[str], *, max_len: int = 256) -> Calibration:
    """A few sentences (LaCo's few-shot calibration), right-padded with a mask."""
    if not texts:
        raise CalibrationError("no calibration sentences given")
    enc = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_len] for t in texts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return Calibration(ids, mask, {"source": "sentences", "num_windows": len(enc), "max_len": max_len})


def sentences_from_file(tokenizer: Any, path: str | Path, *, max_len: int = 256) -> Calibration:
    """One calibration sample per non-empty line of a text file."""
    lines = [line.strip() for line in _read_local(Path(path)).splitlines() if line.strip()]
    cal = sentences(tokenizer, lines, max_len=max_len)
    cal.description["source"] = f"sentences:{path}"
    return cal


__all__ = [
    "Calibration",
    "CalibrationError",
    "CalibrationSpec",
    "check_room",
    "check_text_source",
    "read_jsonl",
    "HUB_TEXTS",
    "HubText",
    "consecutive_windows",
    "read_text",
    "sample_windows",
    "sentences",
    "sentences_from_file",
    "special_prefix",
]
