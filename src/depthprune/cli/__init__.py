"""The ``depthprune`` command line: thin commands over the Python API.

``app`` lives in :mod:`.app`; the command modules register on it when
imported below (nothing imports back up). :func:`main` turns an input error
(:class:`~depthprune.errors.DepthpruneError`) into one line and exit code 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging

import typer

from . import evaluate, prune, recover  # noqa: F401  (each registers its commands on app)
from .app import app


def main(argv: list[str] | None = None) -> int:
    from ..errors import DepthpruneError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        app(args=argv, prog_name="depthprune")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except DepthpruneError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        return 2
    return 0


__all__ = ["app", "main"]
