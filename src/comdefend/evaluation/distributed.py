"""Running one evaluation on several processes (``torchrun``), on one machine or several.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every process loads the models and the
images, takes its share of the attack batches, and sends its per-image records
(:mod:`comdefend.evaluation.records`) to rank 0, which writes the report. The share is decided by
batch numbers only (batch ``b`` of ``--batch-size`` images goes to rank ``b * world // batches``),
and every random choice of the engine is seeded per batch, so the report is identical to the
single-process one whatever the number of processes. The environment, the device (one GPU per
process: ``cuda:LOCAL_RANK``), the backend (``nccl`` on GPUs, else ``gloo``) and how long a
process waits for the others (``COMDEFEND_DIST_TIMEOUT``, 10 minutes by default: a process that
froze stops the others then, and ``--resume`` goes on from the finished groups) are those of
training, from :mod:`comdefend.distributed`.

Records travel as safetensors bytes in uint8 tensors (nothing is pickled).

Example:
    >>> group = ProcessGroup.single()
    >>> group.shard(5)
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comdefend.distributed import exchange, join_process_group, launch_environment
from comdefend.errors import ComDefendError, UsageError


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 outside torchrun; see
    :func:`comdefend.distributed.launch_environment`)."""
    return launch_environment().world_size


def torchrun_rank() -> int:
    """``RANK`` set by torchrun (0 outside torchrun)."""
    return launch_environment().rank


@dataclass
class ProcessGroup:
    """This process's place in the run.

    Attributes:
        rank: this process's number (0 writes the report).
        world_size: number of processes.
        device: the device this process computes on.
        initialized: whether this object started ``torch.distributed`` (and ends it).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @staticmethod
    def single(device: torch.device | None = None) -> ProcessGroup:
        return ProcessGroup(0, 1, device or torch.device("cpu"))

    @staticmethod
    def from_environment(device: torch.device) -> ProcessGroup:
        """Join the torchrun job this process belongs to (a single process outside torchrun).

        Args:
            device: the run's device; a CUDA device becomes ``cuda:LOCAL_RANK``.

        Raises:
            UsageError: a broken torchrun environment, a numbered GPU, or more processes on a
                node than it has GPUs (:func:`comdefend.distributed.join_process_group`).
        """
        launch = launch_environment()
        if not launch.distributed:
            return ProcessGroup.single(device)
        import torch.distributed as dist

        device, initialized = join_process_group(launch, device)
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), device, initialized)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: int) -> list[int]:
        """The batch numbers this process evaluates: a contiguous block, deterministic."""
        start = self.rank * batches // self.world_size
        stop = (self.rank + 1) * batches // self.world_size
        return list(range(start, stop))

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every process's ``data``, in rank order (all processes receive them)."""
        if self.world_size == 1:
            return [data]
        import torch.distributed as dist

        device = self._comm_device()
        size = torch.tensor([len(data)], dtype=torch.long, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        with exchange("exchanging results", "the same command with --resume continues"):
            dist.all_gather(sizes, size)
            longest = int(max(int(s) for s in sizes))
            buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
            if data:
                buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buffers = [torch.zeros_like(buffer) for _ in range(self.world_size)]
            dist.all_gather(buffers, buffer)
        return [
            bytes(b[: int(s)].cpu().numpy().tobytes()) for b, s in zip(buffers, sizes, strict=True)
        ]

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's ``data`` on every process."""
        if self.world_size == 1:
            return data
        return self.gather_bytes(data if self.is_main else b"")[0]

    def agree(self, error: ComDefendError | None) -> None:
        """Raise on every process if any process failed (so that none waits forever)."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        messages = self.gather_bytes(str(error).encode() if error is not None else b"")
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message:
                raise UsageError(f"process {rank} failed: {message.decode()}")

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialized = False
