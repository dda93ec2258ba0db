"""What the checkpoint-writing commands share beyond the job itself: layer streaming, pushing to the Hub, and
:func:`finish`, which takes a job from the parsed options to its saved (and pushed) checkpoint.

``--stream`` / ``--no-stream`` choose the path; without either, streaming is
chosen when the weights (from the safetensors headers) would not fit in
``--max-memory`` or the available memory, and the command says so.
``--push-to-hub REPO`` writes a model card into the checkpoint and uploads it
once it is saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from ..distributed import check_launch, processes
from .groups import ModelGroup, PushGroup, StreamingGroup
from .summary import print_result

if TYPE_CHECKING:
    from ..backend import Backend
    from ..job import Job, JobResult


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


@dataclass(frozen=True)
class Opener:
    """How a command opens a model source: in memory through :meth:`ModelGroup.load`, or streamed within
    ``budget`` bytes. A kl/top1 reference that is another model is opened the same way as the input."""

    model: ModelGroup
    streamed: bool
    budget: int | None

    @classmethod
    def choose(cls, model: ModelGroup, streaming: StreamingGroup | None) -> Opener:
        """``streaming`` None: the command has no streaming options and never streams; ``--stream`` not given:
        decided from the model's size, and said. A launch of several processes that cannot stream is refused."""
        streamed, budget = False, None
        if streaming is not None and (streaming.stream is not False or streaming.max_memory is not None):
            streamed, budget, _ = streaming_choice(model.model, streaming.stream, streaming.max_memory, model.dtype,
                                                   model.device)
        check_launch(batch_size=None, eval_batch_size=None, stream=streamed)
        return cls(model, streamed, budget)

    def __call__(self, source: str) -> "Backend":
        from ..backend import InMemoryBackend, load_streamed
        from ..models.load import resolve_dtype

        model = self.model
        if not self.streamed:
            return InMemoryBackend.of(model.load(source))
        typer.echo(f"streaming {source} ...", err=True)
        return load_streamed(source, dtype=model.dtype, device=model.device, progress=not model.quiet,
                             max_memory=self.budget, report=None if model.quiet else say,
                             save_dtype=resolve_dtype(model.dtype, "cpu") if model.dtype else None)


def open_backend(model: ModelGroup, streaming: StreamingGroup | None) -> "Backend":
    """The model as a backend: streamed when ``--stream`` asks or the weights would not fit (said), else loaded
    in memory (see :meth:`Opener.choose`)."""
    return Opener.choose(model, streaming)(model.model)


def finish(job: "Job", model: ModelGroup, streaming: StreamingGroup | None, push: PushGroup, out: Any,
           overwrite: bool) -> "JobResult":
    """Run a checked job that writes a checkpoint from a command's parsed options, print what it did, then push
    it when asked: what every checkpoint-writing command ends with.

    Everything that can be refused is refused before the model loads: the Hub repository, what the chosen
    backend (streamed or in memory, see :meth:`Opener.choose`) cannot do; a kl/top1 reference that is another
    model is measured and freed before the input loads.
    """
    from ..export.hub import card_writer, check_repo_id, push_checkpoint
    from ..job import run_job

    repo = check_repo_id(push.push_to_hub) if push.push_to_hub is not None else None
    writers = [card_writer(command_line(), repo)] if repo else []
    opener = Opener.choose(model, streaming)
    job.check_backend("streamed" if opener.streamed else "in-memory")
    if processes().main:
        job.evaluation.prepare(model.model, first_is_input=job.evaluate_before or not job.stages,
                               open_reference=opener, progress=not model.quiet)
    result = run_job(opener(model.model), job, out=out, overwrite=overwrite, writers=writers)
    if not processes().main:
        return result  # the main process reports and pushes
    print_result(result)
    if repo:
        pushed = push_checkpoint(result.out, repo)
        say(f"uploaded {len(pushed.files)} files to {pushed.url}")
    return result
