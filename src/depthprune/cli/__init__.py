"""The ``depthprune`` command line: thin commands over the Python API.

``app`` lives in :mod:`.app`; the command modules register on it when
imported below (nothing imports back up). :func:`main` turns an input error
(:class:`~depthprune.errors.DepthpruneError`, and click's usage errors: an
unknown option, a value that does not parse) into one ``error:`` line and exit
code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import typer

from ..distributed import error_prefix, processes
from . import evaluate, export, prune, recover  # noqa: F401  (each registers its commands on app)
from .app import NoArgsIsHelpError, app, click_errors
from .streaming import remember_argv


class Terminated(BaseException):
    """SIGTERM, raised as an exception so every ``finally`` (temporary outputs, scratch space) cleans up.

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` swallows it.
    """


def _terminate(signum, frame) -> None:
    raise Terminated()


CTRL_C = 130
"""The exit code of a run stopped by Ctrl-C (128 + SIGINT)."""


def _say_interrupted() -> None:
    """The one line an interrupted run prints (every ``finally`` has removed its temporaries by now)."""
    typer.secho("interrupted: nothing half-written was left at the output", fg=typer.colors.RED, err=True)


def one_line(message: str) -> str:
    """An error as the one line the command prints (a message with line breaks is joined with spaces)."""
    return " ".join(message.split())


CHECKS_GRACE_S = 5.0
"""How long a non-main process of a launch that failed a check waits before exiting, so the main process
(failing the same check) prints its error line before the launcher stops it."""


def _say_error(message: str, err: BaseException) -> None:
    """The one ``error:`` line of a failed command; in a launch of several processes, see
    :func:`~depthprune.distributed.error_prefix`."""
    prefix = error_prefix(err)
    if prefix is None:
        time.sleep(CHECKS_GRACE_S)
        return
    typer.secho(f"error: {prefix}{one_line(message)}", fg=typer.colors.RED, err=True)


def main(argv: list[str] | None = None) -> int:
    from ..errors import DepthpruneError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    remember_argv(argv if argv is not None else sys.argv[1:])
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signal handling to the host
        previous = None
    try:
        code = app(args=argv, prog_name="depthprune", standalone_mode=False)
        if code == CTRL_C:  # Typer turns KeyboardInterrupt into a silent exit with code 130
            _say_interrupted()
        return code if isinstance(code, int) else 0
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except NoArgsIsHelpError as help_asked:
        typer.echo(help_asked.ctx.get_help())
        return 0
    except click_errors.UsageError as err:
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        _say_error(f"{err.format_message()}{where}", err)
        return 2
    except DepthpruneError as err:
        _say_error(str(err), err)
        return 2
    except click_errors.ClickException as err:
        _say_error(err.format_message(), err)
        return 2
    except (KeyboardInterrupt, Terminated, typer.Abort) as stop:
        if processes().main:  # only the main process writes, so only it can have left something
            _say_interrupted()
        return 143 if isinstance(stop, Terminated) else CTRL_C
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


__all__ = ["app", "main"]
