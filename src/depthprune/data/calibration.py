"""Calibration and evaluation text: where it comes from and how it becomes token windows.

Sources, by name:
  ``general``                   the default: fiction, encyclopedic and code windows in equal shares
  ``a+b+...``                   any mixture of sources, windows drawn from each in equal shares
  ``fiction|encyclopedic|code``  shipped calibration texts of three domains (no network; :mod:`.shipped`)
  ``heldout-fiction|heldout-encyclopedic|heldout-code``  shipped held-out texts of the same domains, from other
                                documents, for evaluation
  ``default``                   Pride and Prejudice, first 85% (shipped; ``default-heldout`` = ``heldout-fiction``)
  ``fineweb-edu|slimpajama``    general web/mixed corpora the field recovers on (FineWeb-Edu sample-10BT,
                                SlimPajama validation), streamed via ``datasets``
  ``bookcorpus|pg19|c4|wikitext2|wikitext2-test|ptb``  hub datasets via ``datasets``
  ``path/to/file.txt|.jsonl``   local text (jsonl: a ``text`` field per line)

Windows carry the tokenizer's own default special prefix (``<bos>`` for Gemma,
nothing for Qwen or SmolLM2), inside the window length: a 128-token window is
128 tokens including BOS.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Collection

import torch

from ..checks import check_name_lengths
from ..errors import InputError
from ..hub_access import hub_offline, hub_reachable
from .selftext import SelfSampling, self_text
from .shipped import DEFAULT_CALIBRATION, EVAL_DOMAINS, MIXTURES, shipped, shipped_names


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
    "fineweb-edu": HubText("HuggingFaceFW/fineweb-edu", "sample-10BT", "train"),
    "slimpajama": HubText("cerebras/SlimPajama-627B", None, "validation"),
    "bookcorpus": HubText("bookcorpus/bookcorpus", None, "train"),
    "pg19": HubText("deepmind/pg19", None, "validation"),
    "c4": HubText("allenai/c4", "en", "validation"),
    "wikitext2": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "train", streaming=False),
    "wikitext2-test": HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "test", streaming=False),
    "ptb": HubText("ptb-text-only/ptb_text_only", None, "test", field="sentence", streaming=False),
}


def mixture_parts(source: str | Path) -> list[str] | None:
    """The texts of a mixture (``general``, or any ``a+b+c`` of sources), else None: its windows are drawn from
    every part equally (stratified), whatever each part's length."""
    name = MIXTURES.get(str(source), str(source)) if isinstance(source, str) else None
    if name is None or "+" not in name or Path(name).expanduser().exists():  # a file may have + in its name
        return None
    parts = [p.strip() for p in name.split("+")]
    if not all(parts):
        raise CalibrationError(f"--calib {source!r}: a mixture is SOURCE+SOURCE (e.g. fiction+code), with no "
                               "empty part")
    return parts


def named_texts(source: str | Path) -> list[str] | None:
    """The shipped texts a name stands for (one, or a mixture's parts), else None (a file or a hub dataset)."""
    parts = mixture_parts(source) or [str(source)]
    texts = [shipped(part) for part in parts]
    if any(t is None for t in texts):
        return None
    return [t.read() for t in texts]


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
        with hub_offline() if "/" in source.path and not hub_reachable() else nullcontext():
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
    """Return (text, description) for a source name or file path (a mixture: its parts joined)."""
    parts = mixture_parts(source)
    if parts is not None:
        read = [read_text(part) for part in parts]
        return "\n\n".join(t for t, _ in read), f"{source}: " + " + ".join(d for _, d in read)
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

    def domains(self) -> list[tuple[str, int, int]]:
        """(domain, first window, end) of each text the windows came from; one unnamed span for a single text."""
        spans = self.description.get("domains")
        if not spans:
            return [("", 0, self.num_windows)]
        return [(name, lo, hi) for name, (lo, hi) in spans.items()]

    def first(self, count: int) -> "Calibration":
        """The first ``count`` windows (a cheap, lower-fidelity sample of the same text)."""
        return Calibration(self.input_ids[:count], self.attention_mask[:count],
                           {**self.description, "windows_used": min(count, self.num_windows)})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.description)


@dataclass
class CalibrationSpec:
    """Where calibration comes from: sampled token windows, or a file of sentences (LaCo)."""

    source: str = DEFAULT_CALIBRATION
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
        for part, settings in self.self_parts().items():
            share = -(-(self.num_windows + self.HELDOUT_WINDOWS) // len(mixture_parts(self.source) or [1]))
            settings.check(self.seq_len, share)
        if self.sentences_file is not None:
            check_text_source(self.sentences_file, "--calib-sentences")
        elif text is not None:
            check_room(text, self.num_windows, self.seq_len)
        return self

    #: Windows held out of every fit, for ranking candidate plans (``--method auto``).
    HELDOUT_WINDOWS = 16

    def self_parts(self) -> dict[str, SelfSampling]:
        """The parts of the source sampled from the model (``self``, ``general+self``), with their settings."""
        parts = mixture_parts(self.source) or [self.source]
        return {p: s for p in parts if (s := SelfSampling.parse(p)) is not None}

    @property
    def needs_model(self) -> bool:
        return self.sentences_file is None and bool(self.self_parts())

    def sample_from(self, model: Any, tokenizer: Any, progress: bool = True) -> None:
        """Sample (or read from the cache) the text of every ``self`` part from ``model``, the dense model, before
        any window is drawn; what was sampled, and how fast, goes into every window set's description."""
        sampled, records = {}, {}
        for part, settings in self.self_parts().items():
            sampled[part], records[part] = self_text(model, tokenizer, settings, progress)
        self.__dict__.update(_sampled=sampled, _sampled_records=records)
        self.__dict__.pop("_cuts", None)

    def _slots(self, tokenizer: Any) -> "_Slots | _MixedSlots":
        """The text cut into windows for ``tokenizer``: tokenized once, read by every window set drawn from it
        (planning, held-out, each fit's) and by :meth:`fit_capacity`."""
        cache = self.__dict__.setdefault("_cuts", {})
        key = tokenizer_key(tokenizer)
        if key not in cache:
            cache[key] = cut_slots(tokenizer, self.source, None, self.seq_len, self.__dict__.get("_sampled"))
        return cache[key]

    def _sample(self, tokenizer: Any, **kwargs: Any) -> "Calibration":
        cal = sample_windows(tokenizer, self.source, seq_len=self.seq_len, slots=self._slots(tokenizer), **kwargs)
        if self.__dict__.get("_sampled_records"):
            cal.description["sampled"] = self.__dict__["_sampled_records"]
        return cal

    def heldout(self, tokenizer: Any) -> "Calibration":
        """Windows of the same text disjoint from the planning windows, never used to fit anything."""
        planning = self.windows(tokenizer).description.get("slots", [])
        return self._cached(tokenizer, ("heldout",), lambda: self._sample(
            tokenizer, num_windows=self.HELDOUT_WINDOWS, seed=self.seed + 1, exclude=planning))

    def fit_windows(self, tokenizer: Any, num_windows: int, seed: int) -> "Calibration":
        """Windows for fitting (compensation maps): any of the text except the held-out windows."""
        heldout = self.heldout(tokenizer).description["slots"]
        return self._cached(tokenizer, ("fit", num_windows, seed), lambda: self._sample(
            tokenizer, num_windows=num_windows, seed=seed, exclude=heldout))

    def fit_capacity(self, tokenizer: Any) -> int:
        """How many windows :meth:`fit_windows` can draw: the text's, less the held-out windows."""
        heldout = self.heldout(tokenizer).num_windows
        return len(self._slots(tokenizer)) - heldout

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
        return self._cached(tokenizer, ("windows",), lambda: self._sample(
            tokenizer, num_windows=self.num_windows, seed=self.seed))


def tokenizer_key(tokenizer: Any) -> tuple:
    """Identifies a tokenizer's behaviour well enough to reuse windows made with an equal one."""
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None), len(tokenizer),
            tuple(special_prefix(tokenizer)))


NAMED_TEXTS = tuple(shipped_names())


def check_text_source(source: str | Path, option: str) -> str | None:
    """A named text or a readable file holding text; anything else is caught before loading the model.

    Returns the text (a mixture's parts joined), or None for a hub dataset (read only when it is used: it may
    need the network).
    """
    parts = mixture_parts(source)
    if parts is not None:
        texts = [check_text_source(part, f"{option} {source}: part") for part in parts]
        return None if any(t is None for t in texts) else "\n\n".join(texts)
    if str(source) in HUB_TEXTS or SelfSampling.parse(str(source)) is not None:
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
    def cut(cls, tokenizer: Any, source: str | Path, text: str | None, seq_len: int,
            sampled: dict[str, list[int]] | None = None) -> "_Slots":
        prefix = special_prefix(tokenizer)
        if seq_len - len(prefix) < 1:
            raise CalibrationError(f"--seq-len {seq_len} leaves no room after the special prefix")
        if text is None and SelfSampling.parse(str(source)) is not None:
            if not sampled or str(source) not in sampled:
                raise CalibrationError(f"--calib {source}: text sampled from the model needs the model; run it "
                                       "through a job (prune, run, bench) or CalibrationSpec.sample_from(model)")
            slots = cls(list(sampled[str(source)]), prefix, seq_len, f"{source}: sampled from the model")
        else:
            text, desc = read_text(source) if text is None else (text, "inline text")
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

    def strata(self) -> list[range]:
        """Slots windows are drawn from in equal shares: one text is one stratum."""
        return [range(len(self))]

    def description(self) -> dict[str, Any]:
        return {"source": self.source, "seq_len": self.seq_len, "special_prefix": self.prefix,
                "text_tokens": len(self.ids)}


@dataclass
class _MixedSlots:
    """The slots of several texts, numbered one text after another; each text is a stratum."""

    parts: list[_Slots]
    source: str

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def strata(self) -> list[range]:
        out, at = [], 0
        for part in self.parts:
            out.append(range(at, at + len(part)))
            at += len(part)
        return out

    def window(self, i: int) -> list[int]:
        for part, stratum in zip(self.parts, self.strata()):
            if i in stratum:
                return part.window(i - stratum.start)
        raise IndexError(i)

    def description(self) -> dict[str, Any]:
        first = self.parts[0].description()
        return {**first, "source": self.source, "text_tokens": sum(len(p.ids) for p in self.parts),
                "parts": [p.source for p in self.parts]}


def cut_slots(tokenizer: Any, source: str | Path, text: str | None, seq_len: int,
              sampled: dict[str, list[int]] | None = None) -> "_Slots | _MixedSlots":
    """``source``'s windows; ``sampled`` holds the token ids of its ``self`` parts (sampled from the model)."""
    parts = mixture_parts(source) if text is None else None
    if parts is None:
        return _Slots.cut(tokenizer, source, text, seq_len, sampled)
    return _MixedSlots([_Slots.cut(tokenizer, part, None, seq_len, sampled) for part in parts],
                       f"{source} ({'+'.join(parts)}, equal shares)")


def stratified_sample(strata: list[range], free: set[int] | None, count: int, seed: int) -> list[int]:
    """``count`` slots drawn without replacement, as equal a share from each stratum as its free slots allow
    (the remainder to the first strata); one stratum is a plain seeded draw."""
    rng = random.Random(seed)
    pools = [[i for i in s if free is None or i in free] for s in strata]
    if count > sum(map(len, pools)):
        raise CalibrationError(f"only {sum(map(len, pools))} windows are free, {count} were asked for")
    if len(pools) == 1:
        return sorted(rng.sample(pools[0], count))
    shares, left = [0] * len(pools), count
    while left:
        for k, pool in enumerate(pools):
            if left and shares[k] < len(pool):
                shares[k], left = shares[k] + 1, left - 1
    return sorted(i for pool, n in zip(pools, shares) for i in rng.sample(pool, n))


def _stack(windows: list[list[int]]) -> Calibration:
    ids = torch.tensor(windows, dtype=torch.long)
    return Calibration(ids, torch.ones_like(ids))


def sample_windows(
    tokenizer: Any,
    source: str | Path = DEFAULT_CALIBRATION,
    *,
    num_windows: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    text: str | None = None,
    exclude: Collection[int] = (),
    slots: "_Slots | _MixedSlots | None" = None,
) -> Calibration:
    """``num_windows`` random non-overlapping windows of ``seq_len`` tokens (seeded).

    The text is cut into consecutive slots of ``seq_len`` tokens and
    ``num_windows`` slots are drawn without replacement, as ShortGPT's
    non-overlapping windows and SLM's random 128-token samples both require.
    Slots in ``exclude`` are never drawn (held-out windows stay held out); the
    slots drawn are recorded in the description. ``slots``: the text already cut (by :func:`cut_slots` with
    these arguments; how text sampled from the model is drawn from), to draw from without tokenizing it again.
    """
    if num_windows < 1 or seq_len < 2:
        raise CalibrationError("need at least 1 window of at least 2 tokens")
    if slots is None:
        slots = cut_slots(tokenizer, source, text, seq_len)
    excluded = set(exclude)
    free = {i for i in range(len(slots)) if i not in excluded}
    if len(free) < num_windows:
        raise CalibrationError(
            f"calibration text holds only {len(free)} windows of {seq_len} tokens available but {num_windows} "
            "were requested; use a longer text, fewer windows or tokens, or a smaller --seq-len"
        )
    picked = stratified_sample(slots.strata(), free, num_windows, seed)
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


DEFAULT_EVAL_TEXTS = ",".join(f"{domain}={name}" for domain, name in EVAL_DOMAINS.items())
"""The shipped held-out set, one text per domain: ``fiction=heldout-fiction,encyclopedic=...,code=...``."""
PPL_WINDOWS = 16
"""Windows per held-out text by default: three texts x 16 x 128 tokens is about what one text's 40 windows were."""


def parse_eval_texts(value: str, option: str = "--eval-texts") -> dict[str, str]:
    """``NAME=SOURCE,...`` as {domain: source}; a lone ``SOURCE`` is one text with no domain name ("").

    Checked before any model loads: each source readable (a shipped name, a hub dataset or a file), no domain
    named twice, no empty name."""
    entries = [e.strip() for e in str(value).split(",") if e.strip()]
    if not entries:
        raise CalibrationError(f"{option} is empty: give SOURCE or NAME=SOURCE,NAME=SOURCE")
    if len(entries) == 1 and "=" not in entries[0]:
        return {"": entries[0]}
    texts: dict[str, str] = {}
    for entry in entries:
        name, sep, source = entry.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise CalibrationError(f"{option}: {entry!r} is not NAME=SOURCE (e.g. fiction=heldout-fiction); "
                                   "with several texts each needs a name")
        if "/" in name:
            raise CalibrationError(f"{option}: the domain name {name!r} may not hold '/' (metrics are named "
                                   "kl/NAME)")
        if name in texts:
            raise CalibrationError(f"{option}: the domain {name!r} is named twice; give each text its own name")
        texts[name] = source
    return texts


def domain_windows(tokenizer: Any, texts: dict[str, str | Path], *, seq_len: int = 128,
                   max_windows: int | None = None) -> Calibration:
    """Consecutive windows from the start of each text (at most ``max_windows`` each), one after another; the
    description's ``domains`` says which windows came from which text, so one pass measures them all and each
    text's numbers are split out of it."""
    parts = {name: consecutive_windows(tokenizer, source, seq_len=seq_len, max_windows=max_windows)
             for name, source in texts.items()}
    if len(parts) == 1 and "" in parts:
        return parts[""]
    first = next(iter(parts.values()))
    cal = Calibration(torch.cat([p.input_ids for p in parts.values()]),
                      torch.cat([p.attention_mask for p in parts.values()]))
    spans, at = {}, 0
    for name, part in parts.items():
        spans[name] = [at, at + part.num_windows]
        at += part.num_windows
    cal.description = {"source": ",".join(f"{n}={source}" for n, source in texts.items()),
                       "seq_len": seq_len, "special_prefix": first.description["special_prefix"],
                       "num_windows": at, "domains": spans}
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
    "named_texts",
    "read_jsonl",
    "HUB_TEXTS",
    "HubText",
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVAL_TEXTS",
    "PPL_WINDOWS",
    "consecutive_windows",
    "domain_windows",
    "parse_eval_texts",
    "read_text",
    "sample_windows",
    "sentences",
    "sentences_from_file",
    "special_prefix",
]
