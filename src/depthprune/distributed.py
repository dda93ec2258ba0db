"""Several processes, one job: what a data-parallel launch (``accelerate launch``, ``torchrun``) changes.

The launcher starts N copies of the command with ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` set. Every copy
loads the model, reads and tokenizes the training data itself (the same deterministic result, so nothing is
sent between them) and trains its share of each batch; the *main* process (rank 0) alone evaluates, builds
what is cached on disk (the teacher's distributions), writes the output and prints the result. The others
wait where they must read what the main process made and exit 0 when training ends.

The process group comes from accelerate (gloo on CPU, NCCL on GPUs), the same one the Trainer then uses.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

from .errors import DepthpruneError, InputError

T = TypeVar("T")

GROUP_TIMEOUT = timedelta(hours=4)
"""How long a process waits for the others at a collective: the main process evaluates the model before
training while the others wait, which for a large model and zero-shot tasks can take hours (torch's default
is 30 minutes). A process that fails stops the others at once anyway: the launcher kills them."""


@dataclass(frozen=True)
class Processes:
    """This process's place in the launch: ``rank`` of ``world`` (1 process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def processes() -> Processes:
    """The launch this process belongs to, from the variables the launcher sets (no process group needed)."""
    return Processes(rank=_env_int("RANK", default=0), world=_env_int("WORLD_SIZE", default=1),
                     local_rank=_env_int("LOCAL_RANK", default=0))


@contextmanager
def working() -> Iterator[None]:
    """Mark the errors raised inside as raised while the launch worked (after every check passed), which each
    process then reports itself (see :func:`error_prefix`)."""
    try:
        yield
    except DepthpruneError as err:
        err.during_work = True
        raise


def error_prefix(err: BaseException) -> str | None:
    """How this process reports ``err``: ``""`` (as usual), ``"process R of N: "``, or None (say nothing: a
    check failed before the work began, and every process of the launch runs the same checks on the same
    inputs, so the main process prints the same line; the launcher then stops the others)."""
    launch = processes()
    if launch.main:
        return ""
    return f"process {launch.rank} of {launch.world}: " if getattr(err, "during_work", False) else None


def join() -> Any:
    """Join the process group (once; accelerate keeps it) and return accelerate's ``PartialState``."""
    import torch
    from accelerate import PartialState

    # without cpu=True accelerate joins the group but reports one process on a machine with no GPU
    return PartialState(cpu=not torch.cuda.is_available(), timeout=GROUP_TIMEOUT)


def wait_for_all() -> None:
    """A barrier across the launch; nothing with one process."""
    if processes().several:
        join().wait_for_everyone()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block in the main process first, then in the others, which find what it cached (the teacher's
    distributions, text sampled from the model) instead of making it again."""
    launch = processes()
    if launch.several and not launch.main:
        wait_for_all()
    yield
    if launch.several and launch.main:
        wait_for_all()


def from_main(value: Any) -> Any:
    """The main process's ``value``, in every process (``value`` of the others is ignored)."""
    if not processes().several:
        return value
    from accelerate.utils import broadcast_object_list

    join()
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def share(items: Sequence[T]) -> list[T]:
    """This process's part of a global batch: every ``world``-th item from its rank (all of them alone)."""
    launch = processes()
    return list(items[launch.rank :: launch.world])


def summed(*values: float) -> list[float]:
    """Each value summed over the launch (in float64, the same result in every process); as given alone."""
    if not processes().several:
        return list(values)
    import torch
    import torch.distributed as dist

    box = torch.tensor(values, dtype=torch.float64, device=join().device)  # NCCL reduces on the GPU only
    dist.all_reduce(box)
    return box.cpu().tolist()


def sum_gradients(params: Sequence[Any]) -> None:
    """Sum every parameter's gradient over the launch in place (a parameter without one counts as zero): each
    process back-propagated its share of a loss normalised by the global batch, so the sum is the gradient one
    process would have of the whole batch. Nothing happens alone."""
    if not processes().several:
        return
    import torch
    import torch.distributed as dist

    join()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def check_launch(*, batch_size: int | None, eval_batch_size: int | None, stream: bool | None) -> None:
    """Refuse, before any model loads, a launch the run cannot honour.

    ``--batch-size`` is the global batch (split across the processes, so every optimizer step sees the
    examples a single process would): it must divide evenly. Streaming keeps one layer in memory at a time
    and has no data-parallel form.
    """
    launch = processes()
    if not launch.several:
        return
    if stream:
        raise InputError(f"layer streaming (--stream, or chosen because the model does not fit in memory) runs "
                         f"in one process and this launch has {launch.world}: launch one process, or give each "
                         "process the whole model (--no-stream, enough memory per process)")
    for flag, size in (("--batch-size", batch_size), ("the evaluation batch", eval_batch_size)):
        if size is not None and size % launch.world:
            raise InputError(f"{flag} {size} is the global batch and cannot be split across {launch.world} "
                             f"processes: use a multiple of {launch.world} (e.g. {launch.world * max(1, size // launch.world)}) "
                             "or launch fewer processes")
    if uses_deepspeed() and importlib.util.find_spec("deepspeed") is None:
        raise InputError("this launch uses DeepSpeed (an accelerate config with deepspeed_config) but the "
                         "deepspeed package is not installed: pip install deepspeed, or launch with the FSDP "
                         "or plain data-parallel config in examples/")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def uses_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it says so in the environment)."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def requested_engine() -> str | None:
    """The sharded engine the launch's accelerate config asks for (``FSDP``, ``DEEPSPEED``), if any."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return "DEEPSPEED" if uses_deepspeed() else None
