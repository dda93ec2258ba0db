"""The Typer application every command module registers on (a leaf: it imports no command), and the parts of
click that the commands use (usage errors, where a value came from)."""

from __future__ import annotations

import typer

try:  # Typer 0.2x ships its own copy of click (typer._click); older Typers run on click itself
    from typer._click import exceptions as click_errors
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click_errors
    from click.core import ParameterSource
    from click.globals import get_current_context

#: Raised for a bare ``depthprune`` (help is shown); click before 8.2 has no such error.
NoArgsIsHelpError = getattr(click_errors, "NoArgsIsHelpError", ())

app = typer.Typer(
    help="Make LLMs shallower: score layers, remove or merge them, heal, save a plain transformers "
    "checkpoint, and measure what was lost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
