"""What the checkpoint-writing commands share beyond the job itself: layer streaming and pushing to the Hub.

``--stream`` / ``--no-stream`` choose the path; without either, streaming is
chosen when the weights (from the safetensors headers) would not fit in
``--max-memory`` or the available memory, and the command says so.
``--push-to-hub REPO`` writes a model card into the checkpoint and uploads it
once it is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

if TYPE_CHECKING:
    from ..job import Job, JobResult
    from ..models.load import LoadedModel

StreamOpt = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="Layer streaming: keep the weights on disk and load one decoder layer at a "
    "time (every method but auto; scoring, searches, surgery and ppl). Default: chosen when the weights would not fit in "
    "--max-memory or the available memory.", show_default=False)]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Memory budget such as 8GB: decides streaming, and streamed calibration states that "
    "do not fit beside one layer and the embeddings spill to disk.")]
PushOpt = Annotated[Optional[str], typer.Option(
    "--push-to-hub", help="After saving, upload the checkpoint, plan and report with a generated model card "
    "(README.md) to this Hugging Face Hub repository (owner/name).")]


def say(message: str) -> None:
    typer.echo(message, err=True)


def streaming_choice(model: str, stream: bool | None, max_memory: str | None, dtype: str | None,
                     device: str) -> tuple[bool, int | None, str]:
    """(stream?, the memory budget in bytes, why) for a command's options; says so when streaming."""
    from ..stream.choose import choose_streaming
    from ..stream.states import parse_size

    budget = parse_size(max_memory)
    choice = choose_streaming(model, stream, dtype=dtype, device=device, max_memory=budget)
    if choice.stream and stream is None:
        say(choice.reason)
    return choice.stream, budget, choice.reason


_ARGV: list[str] | None = None


def remember_argv(argv: list[str] | None) -> None:
    """Keep the command line :func:`main` runs, for the model card of a pushed checkpoint."""
    global _ARGV
    _ARGV = list(argv) if argv is not None else None


def command_line() -> str | None:
    """The running command as typed (``depthprune prune ...``), or None outside the command line."""
    import shlex

    return None if _ARGV is None else "depthprune " + shlex.join(_ARGV)


def run_checkpoint_job(job: "Job", *, load: Callable[..., "LoadedModel"], model: str, out: Any,
                       overwrite: bool, dtype: str | None, device: str, quiet: bool, stream: bool | None = False,
                       max_memory: str | None = None, push_to_hub: str | None = None) -> "JobResult":
    """Run a job that writes a checkpoint, streamed or in memory, print what it did, then push it when asked.

    ``load`` is the command's loader for the in-memory path (``load(model, dtype, device, quiet)``).
    ``stream=False`` (commands without streaming) never streams; ``None`` decides from the model's size.
    """
    from ..export.hub import card_writer, check_repo_id, push_checkpoint
    from ..job import run_job
    from ..stream.job import check_streamable, run_streamed_job
    from .prune import print_result

    repo = check_repo_id(push_to_hub) if push_to_hub is not None else None
    writers = [card_writer(command_line(), repo)] if repo else []
    streamed, budget = False, None
    if stream is not False or max_memory is not None:
        streamed, budget, _ = streaming_choice(model, stream, max_memory, dtype, device)
        if streamed:
            check_streamable(job)  # before any work; when chosen automatically, the reason was printed above
    if streamed:
        typer.echo(f"streaming {model} ...", err=True)
        result = run_streamed_job(model, job, out=out, overwrite=overwrite, dtype=dtype, device=device,
                                  max_memory=budget, writers=writers, report=None if quiet else say)
    else:
        # a reference for kl/top1 that is another model is loaded, used and freed before the input loads
        job.evaluation.prepare(model, first_is_input=job.evaluate_before or not job.stages, dtype=dtype,
                               device=device, progress=not quiet)
        result = run_job(load(model, dtype, device, quiet), job, out=out, overwrite=overwrite, writers=writers)
    print_result(result)
    if repo:
        pushed = push_checkpoint(result.out, repo)
        say(f"uploaded {len(pushed.files)} files to {pushed.url}")
    return result
