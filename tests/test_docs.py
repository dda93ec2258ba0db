"""The documentation is checked like code: every command it shows parses, every link resolves.

Commands are taken from the fenced code blocks of README.md and docs/*.md:
each line starting with ``depthprune`` (``\\`` continuations joined, ``#``
comments dropped). In a block that shows a session (``$ command`` followed by
its output), only the ``$`` lines are commands. Each command is parsed the way
the CLI parses it (click's ``make_context`` on the subcommand, so an unknown
option, a bad choice or a missing value fails), and for the commands that take
method flags (``prune``, ``bench``) the extra flags go through
``parse_flags`` and ``build_options`` for the chosen methods, as the command
itself does before loading a model. Nothing here loads a model.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

try:  # typer >= 0.24 carries its own copy of click
    from typer._click import exceptions as cli_errors
    from typer._click.core import Context
except ImportError:  # older typer runs on click itself
    from click import exceptions as cli_errors
    from click import Context

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


@dataclass(frozen=True)
class Command:
    """One shell command shown in a document: where it is and its words."""

    source: str
    line: int
    text: str

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple(words(self.text))

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language tag, first line number and lines."""

    lang: str
    line: int
    lines: tuple[str, ...]


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start, body = opening.group(1), lines[i].strip()[3:].strip().lower(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append(Block(lang, start + 1, tuple(body)))
        i += 1
    return blocks


def prose(text: str, *, inline_code: bool = False) -> str:
    """A markdown text without its fenced blocks (and without inline code unless ``inline_code``)."""
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            kept.append(line if inline_code else re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, command text) of a shell block, continuations joined; output lines skipped."""
    if block.lang not in ("", "bash", "sh", "shell", "console"):
        return []
    session = any(line.lstrip().startswith("$ ") for line in block.lines)
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(block.lines):
        number = block.line + offset
        if pending is None:
            stripped = raw.strip()
            if session:
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:].strip()
            pending = (number, "")
        else:
            stripped = raw.strip()
        text = pending[1] + " " + stripped if pending[1] else stripped
        if text.endswith("\\"):
            pending = (pending[0], text[:-1].rstrip())
            continue
        out.append((pending[0], text))
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def words(text: str) -> list[str]:
    """A command line's words: comments dropped, leading VAR=value settings and anything after a pipe cut."""
    argv = shlex.split(text, comments=True)
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    for i, word in enumerate(argv):
        if word in SHELL_STOP:
            return argv[:i]
    return argv


def shell_commands(text: str, source: str, program: str = "depthprune") -> list[Command]:
    """Every ``program ...`` command in the fenced shell blocks of a markdown text."""
    starts = re.compile(rf"^([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*{re.escape(program)}(\s|$)")
    return [Command(source, number, line) for block in fenced_blocks(text)
            for number, line in shell_lines(block) if starts.match(line)]


def documented(program: str = "depthprune") -> list[Command]:
    return [c for path in doc_files() for c in shell_commands(path.read_text(), path.relative_to(ROOT).as_posix(),
                                                             program)]


# ---------------------------------------------------------------- the checker


def check_command(argv: list[str] | tuple[str, ...]) -> None:
    """Parse a ``depthprune ...`` command as the CLI would, without running it; raise on anything it refuses.

    Raises click's ``UsageError`` (unknown option or command, bad value or choice, missing value) or
    depthprune's ``DepthpruneError`` (an unknown method, a method flag no chosen method takes, a bad method
    option value).
    """
    from depthprune.cli import app
    from depthprune.methods import build_options, get_method, parse_flags

    assert argv and argv[0] == "depthprune", argv
    command = typer.main.get_command(app)
    args, path = list(argv[1:]), ["depthprune"]
    while isinstance(command, TyperGroup) and args and not args[0].startswith("-"):
        sub = command.get_command(Context(command), args[0])
        if sub is None:
            raise cli_errors.UsageError(f"no such command {args[0]!r} in `{' '.join(path)}`")
        path.append(args.pop(0))
        command = sub
    try:
        ctx = command.make_context(" ".join(path), args)
    except typer.Exit as done:  # --help
        if done.exit_code:
            raise
        return
    if isinstance(command, TyperGroup):
        return
    if "methods" in ctx.params:
        methods = [m.strip() for m in ctx.params["methods"].split(",") if m.strip()]
    elif "method" in ctx.params:
        methods = [ctx.params["method"]]
    else:
        methods = []
    for method in methods:
        get_method(method)
    if ctx.args:  # only commands that take method flags accept extra arguments
        for method, values in parse_flags(ctx.args, methods, command=path[-1]).items():
            build_options(method, values)


def rejected(argv: list[str]) -> bool:
    from depthprune.errors import DepthpruneError

    try:
        check_command(argv)
    except (cli_errors.UsageError, DepthpruneError):
        return True
    return False


# ---------------------------------------------------------------- the checker's own tests


def test_checker_rejects_a_misspelt_option():
    assert not rejected(["depthprune", "prune", "--ratio", "0.2"])
    assert rejected(["depthprune", "prune", "--ratioo", "0.2"])


@pytest.mark.parametrize("argv", [
    "depthprune eval-ppl --model pruned/ --datasett wikitext2",       # unknown option of a plain command
    "depthprune prune --method slm --operator avg",                   # a method option's bad choice
    "depthprune prune --method shortgpt --threshold 0.7",             # an option of another method
    "depthprune bench --methods shortgpt,nosuch --ratios 0.25",       # an unknown method
    "depthprune prune --method nosuch --ratio 0.25",
    "depthprune eval-speed --model pruned/ --repeats five",           # a value of the wrong type
    "depthprune export mergekit",                                      # a missing argument
    "depthprune exportt mergekit pruned/",                             # an unknown command
    "depthprune prune --method angular --block",                       # a flag without its value
])
def test_checker_rejects(argv):
    assert rejected(argv.split())


@pytest.mark.parametrize("argv", [
    "depthprune --help",
    "depthprune export --help",
    "depthprune prune --method slm --ratio 0.25 --operator=average",
    "depthprune bench --methods shortgpt,slm,laco --ratios 0.2 --operator average --out b/",
    "depthprune prune --method sleb --ratio 0.25 --objective kl --out p/",
    "depthprune export mergekit pruned/ --out pruned.yaml",
])
def test_checker_accepts(argv):
    assert not rejected(argv.split())


def test_extraction_joins_continuations_drops_comments_and_skips_output():
    text = "\n".join([
        "```bash",
        "depthprune prune --model m --ratio 0.25 \\",
        "    --out p/      # a comment",
        "# depthprune not-a-command (a comment line)",
        "HF_HUB_OFFLINE=0 depthprune eval-zeroshot --tasks piqa | tee log",
        "```",
        "```",
        "$ depthprune eval-ppl --model p/",
        "depthprune engine   64.4   2.5x",
        "```",
        "```python",
        "depthprune = None",
        "```",
    ])
    commands = shell_commands(text, "x.md")
    assert [(c.line, c.argv) for c in commands] == [
        (2, ("depthprune", "prune", "--model", "m", "--ratio", "0.25", "--out", "p/")),
        (5, ("depthprune", "eval-zeroshot", "--tasks", "piqa")),
        (8, ("depthprune", "eval-ppl", "--model", "p/")),
    ]


# ---------------------------------------------------------------- the documents


COMMANDS = documented()


def test_documents_show_commands():
    """The check below is not vacuous: the README and the docs pages show commands."""
    sources = {c.source for c in COMMANDS}
    assert "README.md" in sources
    assert len([s for s in sources if s.startswith("docs/")]) >= 5
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_parses(command):
    check_command(command.argv)


def test_documented_bench_scripts_exist_with_their_options():
    """``python benchmarks/x.py --opt`` in the docs: the script exists and declares every option shown."""
    for command in documented("python"):
        script = command.argv[1]
        if not script.startswith("benchmarks/"):
            continue
        source = (ROOT / script).read_text()
        for word in command.argv[2:]:
            if word.startswith("--"):
                flag = word.split("=")[0]
                assert f'"{flag}"' in source, f"{command.id}: {script} declares no {flag}"


def test_make_targets_named_in_docs_exist():
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    named = []
    for path in doc_files():
        text = path.read_text()
        spans = re.findall(r"`([^`\n]+)`", prose(text, inline_code=True))
        lines = [line for block in fenced_blocks(text) for _, line in shell_lines(block)]
        for snippet in spans + lines:
            if not snippet.startswith("make "):
                continue
            argv = words(snippet)
            if argv[:1] == ["make"]:
                named += [(path.name, t) for t in argv[1:] if not t.startswith("-") and "=" not in t]
    assert named, "the README names make targets"
    missing = [(name, t) for name, t in named if t not in targets]
    assert not missing, f"make targets named in the docs but not in the Makefile: {missing}"


# ---------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(), inline_code=True).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def links(path: Path) -> list[str]:
    return [a or b for a, b in LINK.findall(prose(path.read_text()))]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.name}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_readme_and_links_back():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds the documentation beyond the README"
    from_readme = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not t.startswith("#")}
    unlinked = [p.name for p in pages if p.resolve() not in from_readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    no_way_back = [p.name for p in pages if not any(t.partition("#")[0] == "../README.md" for t in links(p))]
    assert not no_way_back, f"docs pages without a link back to the README: {no_way_back}"


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES} (detail goes " \
                                      "to docs/)"
