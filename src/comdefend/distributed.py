"""Which process of a ``torchrun`` job this is, its device and backend, and how long it waits.

Training (:mod:`comdefend.training.engine`) and evaluation
(:mod:`comdefend.evaluation.distributed`) both run data-parallel under ``torchrun``; both read
its environment and join the process group here, so both refuse the same broken environments
and wait for the others the same time.

- **The environment.** ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` in every process it starts. Without ``WORLD_SIZE`` (or with
  ``WORLD_SIZE=1``) a command runs as one process. A ``WORLD_SIZE`` above 1 without the others,
  or any of them that is not a number in its range, is a :class:`UsageError` that names them (a
  stray ``WORLD_SIZE`` left in a shell, a launcher that is not torchrun).
- **Device and backend.** A CPU run uses ``gloo``; a GPU run uses ``nccl`` with one GPU per
  process, ``cuda:LOCAL_RANK`` (so ``--device cuda`` or ``auto``, never ``cuda:N``).
- **Waiting for the others.** Every process waits at most ``COMDEFEND_DIST_TIMEOUT`` seconds
  (default :data:`DEFAULT_TIMEOUT_S`, 10 minutes; torch's own default is 30) for the others, at
  the start and at every exchange. A process that *dies* ends the others' wait at once (its
  connection closes). One that *freezes* (a hung file system, a stopped process, a stuck GPU)
  keeps them waiting until the timeout: then the waiting processes stop with an error (on GPUs
  NCCL's watchdog ends them), torchrun stops the rest, and the same command with ``--resume``
  goes on from the last checkpoint (training) or the last finished (attack, eps) group
  (evaluation). Raise it when one process may legitimately work alone for longer: rank 0's
  held-out evaluation and final files in training; in evaluation, a process whose share of an
  attack's batches takes longer than another's (an extra batch of a slow attack).

Example:
    >>> launch_environment({})
    Launch(rank=0, world_size=1, local_rank=0, local_world_size=1)
    >>> try:
    ...     launch_environment({"WORLD_SIZE": "2"})
    ... except UsageError as error:
    ...     print(str(error).split(":")[0])
    WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not
    >>> timeout_seconds({"COMDEFEND_DIST_TIMEOUT": "90"})
    90.0
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from comdefend.errors import ComDefendError, UsageError

#: The variables ``torchrun`` sets in every process it starts.
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a process waits for the others (at the start and at each exchange) by default.
DEFAULT_TIMEOUT_S = 600.0
#: The environment variable that sets that wait, in seconds.
TIMEOUT_VARIABLE = "COMDEFEND_DIST_TIMEOUT"

_HOW = (
    "data-parallel runs are started by torchrun, which sets WORLD_SIZE, RANK, LOCAL_RANK, "
    "MASTER_ADDR and MASTER_PORT in every process; unset WORLD_SIZE to run one process"
)


@dataclass(frozen=True)
class Launch:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without torchrun).

    Attributes:
        rank: this process's number, 0 to ``world_size - 1`` (0 writes the files).
        world_size: number of processes.
        local_rank: this process's number on its machine (its GPU).
        local_world_size: processes on this machine (they share its memory).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _whole_number(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def launch_environment(environ: Mapping[str, str] | None = None) -> Launch:
    """The ``torchrun`` variables of ``environ`` (default: this process's environment).

    Raises:
        UsageError: ``WORLD_SIZE`` is not a whole number >= 1, or is above 1 while the other
            torchrun variables are missing or out of range (the message names them).
    """
    environ = os.environ if environ is None else environ
    text = environ.get("WORLD_SIZE")
    if text is None:
        return Launch()
    world_size = _whole_number(text)
    if world_size is None or world_size < 1:
        raise UsageError(f"WORLD_SIZE={text!r} is not a whole number >= 1: {_HOW}")
    if world_size == 1:
        return Launch()
    missing = [name for name in TORCHRUN_VARIABLES[1:] if not environ.get(name, "").strip()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UsageError(f"WORLD_SIZE={text} is set but {', '.join(missing)} {verb} not: {_HOW}")
    rank = _whole_number(environ["RANK"])
    if rank is None or not 0 <= rank < world_size:
        raise UsageError(
            f"RANK={environ['RANK']!r} is not a whole number in [0, {world_size}) "
            f"(WORLD_SIZE={world_size}): {_HOW}"
        )
    local_rank = _whole_number(environ["LOCAL_RANK"])
    if local_rank is None or local_rank < 0:
        raise UsageError(f"LOCAL_RANK={environ['LOCAL_RANK']!r} is not a whole number >= 0: {_HOW}")
    port = _whole_number(environ["MASTER_PORT"])
    if port is None or not 0 < port < 65536:
        raise UsageError(f"MASTER_PORT={environ['MASTER_PORT']!r} is not a port number: {_HOW}")
    # torchrun sets it; another launcher may not: then every process may be on this machine
    local = _whole_number(environ.get("LOCAL_WORLD_SIZE", ""))
    local_world_size = local if local is not None and 1 <= local <= world_size else world_size
    return Launch(rank, world_size, local_rank, local_world_size)


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """How long a process waits for the others: ``COMDEFEND_DIST_TIMEOUT`` seconds, or
    :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        UsageError: the variable is not a finite number of seconds > 0.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(
            f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds > 0 (how long a process of a "
            f"torchrun job waits for the others; default {DEFAULT_TIMEOUT_S:g})"
        )
    return seconds


def backend_for(device: torch.device) -> str:
    """``nccl`` for GPUs, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_device(launch: Launch, device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for a GPU run, ``device`` otherwise.

    Raises:
        UsageError: a numbered GPU (``cuda:N``) in a data-parallel run, or more processes on
            this machine than it has GPUs.
    """
    if device.type != "cuda" or not launch.distributed:
        return device
    if device.index is not None:
        raise UsageError(
            f"with torchrun, use --device cuda or auto, not {device}: each process takes the GPU "
            "of its LOCAL_RANK"
        )
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise UsageError(
            f"process {launch.rank} needs GPU {launch.local_rank} but this machine has {count}: "
            "one process per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


def join_process_group(launch: Launch, device: torch.device) -> tuple[torch.device, bool]:
    """Join the job's process group (backend :func:`backend_for`, timeout
    :func:`timeout_seconds`) unless this process already has; a single process joins nothing.

    Returns:
        This process's device (:func:`process_device`) and whether this call started
        ``torch.distributed`` (the caller then ends it).
    """
    device = process_device(launch, device)
    if not launch.distributed:
        return device, False
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    timeout = timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend_for(device), timeout=timeout)
    return device, True


class LostProcessesError(ComDefendError):
    """An exchange between the processes of a torchrun job failed: one of them stopped, or did
    not answer within :func:`timeout_seconds`."""


@contextmanager
def exchange(what: str, then: str = "") -> Iterator[None]:
    """Turn the failure of the collective operations inside the block (torch raises a bare
    ``RuntimeError``: a closed connection, a timeout) into a :class:`LostProcessesError` that
    says what was being exchanged, the timeout in force and, in ``then``, how to go on."""
    try:
        yield
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or ["no reason given"])[-1]
        raise LostProcessesError(
            f"lost the other processes of this torchrun job while {what}: one of them stopped, "
            f"or did not answer within {TIMEOUT_VARIABLE}={timeout_seconds():g} s (raise it if a "
            f"process may legitimately work alone for longer) [torch: {reason}]"
            + (f"; {then}" if then else "")
        ) from error


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_VARIABLE",
    "TORCHRUN_VARIABLES",
    "Launch",
    "LostProcessesError",
    "backend_for",
    "exchange",
    "join_process_group",
    "launch_environment",
    "process_device",
    "timeout_seconds",
]
