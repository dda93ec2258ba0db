"""The texts depthprune ships: calibration texts of three domains and held-out texts of the same domains.

A pruned model is judged on more than the text it was calibrated on, so calibration and evaluation texts come
from different documents of each domain (no 200-character piece of a held-out text occurs in any calibration
text; ``tests/test_texts.py``):

=========== ============================================ ==================================================
domain      calibration (``--calib NAME``)               held out (``--eval-texts`` default, ``--ppl-data``)
=========== ============================================ ==================================================
fiction     ``fiction``: Emma, Volumes I-II               ``heldout-fiction``: Pride and Prejudice, last 15%
encyclopedic ``encyclopedic``: The World Factbook,        ``heldout-encyclopedic``: WikiText-2 test, its first
            every entry's Background                     articles (benchmark test text: never calibrated on)
code        ``code``: Python standard library modules     ``heldout-code``: other standard library modules
=========== ============================================ ==================================================

``default`` (Pride and Prejudice, first 85%) was the only shipped text before; it stays, and ``default-heldout``
is the same text as ``heldout-fiction``. Credits and licences: ``texts/README.md``; how the files were made:
``scripts/build_texts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

HELDOUT_FRACTION = 0.15
"""The share of Pride and Prejudice held out (``default-heldout``), cut at a paragraph."""


@dataclass(frozen=True)
class ShippedText:
    """A named text inside the package: a file, or one side of a file cut at a paragraph (``part``)."""

    name: str
    file: str
    domain: str
    heldout: bool
    title: str
    part: str = "all"  # "all", "head" (before the cut) or "tail" (from the cut on)

    @property
    def path(self) -> Path:
        return Path(str(resources.files("depthprune.data").joinpath(f"texts/{self.file}")))

    def read(self) -> str:
        return _read(self.file, self.part)

    def describe(self) -> str:
        return f"{self.name}: {self.title}"


@lru_cache(maxsize=None)
def _read(file: str, part: str) -> str:
    text = Path(str(resources.files("depthprune.data").joinpath(f"texts/{file}"))).read_text(encoding="utf-8")
    if part == "all":
        return text
    cut = text.find("\n\n", int(len(text) * (1 - HELDOUT_FRACTION)))
    return text[:cut] if part == "head" else text[cut:]


_TEXTS = (
    ShippedText("fiction", "emma.txt", "fiction", False, "Jane Austen, Emma, Volumes I-II (public domain, shipped)"),
    ShippedText("encyclopedic", "factbook.txt", "encyclopedic", False,
                "The World Factbook (CIA, public domain): every entry's Background, shipped"),
    ShippedText("code", "stdlib.txt", "code", False,
                "Python 3.11 standard library: argparse, dataclasses, statistics, fractions, functools, heapq, "
                "textwrap, contextlib (PSF License, shipped)"),
    ShippedText("default", "pride_and_prejudice.txt", "fiction", False,
                "Pride and Prejudice, first 85% (Project Gutenberg, shipped)", part="head"),
    ShippedText("heldout-fiction", "pride_and_prejudice.txt", "fiction", True,
                "Pride and Prejudice, last 15% (Project Gutenberg, shipped)", part="tail"),
    ShippedText("heldout-encyclopedic", "heldout_wikitext.txt", "encyclopedic", True,
                "WikiText-2 test, first 64 kB (Wikipedia, CC BY-SA 3.0, shipped)"),
    ShippedText("heldout-code", "heldout_stdlib.txt", "code", True,
                "Python 3.11 standard library: pprint, csv, json.encoder, json.decoder, shlex (PSF License, shipped)"),
)
MIXTURES = {"general": "fiction+encyclopedic+code"}
"""Named mixtures: ``general`` draws its windows equally from the three calibration texts (a third each)."""
DEFAULT_CALIBRATION = "general"
"""What every command calibrates, fits and recovers on unless told otherwise (``--calib``)."""
ALIASES = {"default-heldout": "heldout-fiction"}
"""Names kept for plans and commands written before the held-out texts had domain names."""

SHIPPED: dict[str, ShippedText] = {t.name: t for t in _TEXTS}

EVAL_DOMAINS: dict[str, str] = {t.domain: t.name for t in _TEXTS if t.heldout}
"""The default held-out set: one text per domain (fiction, encyclopedic, code)."""


def shipped(name: str) -> ShippedText | None:
    """The shipped text called ``name`` (or an alias of one), else None."""
    text = SHIPPED.get(ALIASES.get(name, name))
    if text is not None and name in ALIASES:
        return ShippedText(name, text.file, text.domain, text.heldout, text.title, text.part)
    return text


def shipped_names() -> list[str]:
    return [*SHIPPED, *ALIASES, *MIXTURES]


def calibration_texts() -> list[ShippedText]:
    return [t for t in _TEXTS if not t.heldout]


def heldout_texts() -> list[ShippedText]:
    return [t for t in _TEXTS if t.heldout]
