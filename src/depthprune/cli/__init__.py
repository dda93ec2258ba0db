"""The ``depthprune`` command line: thin commands over the Python API.

``app`` lives in :mod:`.app`; the command modules register on it when
imported below (nothing imports back up). :func:`main` turns an input error
(:class:`~depthprune.errors.DepthpruneError`) into one line and exit code 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import signal
import sys

import typer

from . import evaluate, export, prune, recover  # noqa: F401  (each registers its commands on app)
from .app import app
from .streaming import remember_argv


class Terminated(BaseException):
    """SIGTERM, raised as an exception so every ``finally`` (temporary outputs, scratch space) cleans up.

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` swallows it.
    """


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from ..errors import DepthpruneError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    remember_argv(argv if argv is not None else sys.argv[1:])
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signal handling to the host
        previous = None
    try:
        app(args=argv, prog_name="depthprune")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except DepthpruneError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        typer.secho("interrupted: nothing half-written was left at the output", fg=typer.colors.RED, err=True)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


__all__ = ["app", "main"]
