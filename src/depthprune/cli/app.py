"""The Typer application every command module registers on (a leaf: it imports no command)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Make LLMs shallower: score layers, remove or merge them, heal, save a plain transformers "
    "checkpoint, and measure what was lost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
