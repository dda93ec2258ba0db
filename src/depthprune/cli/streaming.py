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

from ..distributed import check_launch, processes
from .summary import print_result

if TYPE_CHECKING:
    from ..backend import Backend
    from ..job import Job, JobResult
    from ..models.load import LoadedModel

StreamOpt = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="Layer streaming: keep the weights on disk and load one decoder layer at a "
    "time (scoring, every method, linear/cosine compensation, surgery and ppl). Default: chosen when the weights "
    "would not fit in --max-memory or the available memory.", show_default=False)]
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
    from ..backend.choose import choose_streaming
    from ..backend.states import parse_size

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


def open_backend(model: str, *, load: Callable[..., "LoadedModel"], stream: bool | None, max_memory: str | None,
                 dtype: str | None, device: str, quiet: bool, job: "Job | None" = None) -> "Backend":
    """The model as a backend, streamed or in memory (``stream=False``: a command without streaming never
    streams; ``None``: decided from the model's size, and said). With ``job``, what the chosen backend cannot
    do is refused before anything loads, and a kl/top1 reference that is another model is opened the same way,
    measured and freed before the input loads. ``load`` is the command's in-memory loader."""
    from ..backend import InMemoryBackend, load_streamed
    from ..models.load import resolve_dtype

    streamed, budget = False, None
    if stream is not False or max_memory is not None:
        streamed, budget, _ = streaming_choice(model, stream, max_memory, dtype, device)
    check_launch(batch_size=None, eval_batch_size=None, stream=streamed)

    def open_(source: str) -> "Backend":
        if not streamed:
            return InMemoryBackend.of(load(source, dtype, device, quiet))
        typer.echo(f"streaming {source} ...", err=True)
        return load_streamed(source, dtype=dtype, device=device, progress=not quiet, max_memory=budget,
                             report=None if quiet else say,
                             save_dtype=resolve_dtype(dtype, "cpu") if dtype else None)

    if job is not None:
        job.check_backend("streamed" if streamed else "in-memory")
        if processes().main:
            job.evaluation.prepare(model, first_is_input=job.evaluate_before or not job.stages,
                                   open_reference=open_, progress=not quiet)
    return open_(model)


def run_checkpoint_job(job: "Job", *, load: Callable[..., "LoadedModel"], model: str, out: Any,
                       overwrite: bool, dtype: str | None, device: str, quiet: bool, stream: bool | None = False,
                       max_memory: str | None = None, push_to_hub: str | None = None) -> "JobResult":
    """Run a job that writes a checkpoint, streamed or in memory, print what it did, then push it when asked.

    ``load`` is the command's loader for the in-memory path (``load(model, dtype, device, quiet)``).
    ``stream=False`` (commands without streaming) never streams; ``None`` decides from the model's size.
    """
    from ..export.hub import card_writer, check_repo_id, push_checkpoint
    from ..job import run_job

    repo = check_repo_id(push_to_hub) if push_to_hub is not None else None
    writers = [card_writer(command_line(), repo)] if repo else []
    backend = open_backend(model, load=load, stream=stream, max_memory=max_memory, dtype=dtype, device=device,
                           quiet=quiet, job=job)
    result = run_job(backend, job, out=out, overwrite=overwrite, writers=writers)
    if not processes().main:
        return result  # the main process reports and pushes
    print_result(result)
    if repo:
        pushed = push_checkpoint(result.out, repo)
        say(f"uploaded {len(pushed.files)} files to {pushed.url}")
    return result
