"""Run a network over the chunks of a batch, the chunks spread over threads.

CPU inference cuts a batch into cache-sized chunks (``ComDefend.inference_chunk_size``). Computed
one after another, each with torch's intra-op threads, every small convolution is an OpenMP
parallel region that ends at a barrier; when another process holds one of the cores, each region
waits for the descheduled thread, hundreds of times per batch. :func:`run_chunks` parallelises
*across* chunks instead: each worker thread takes the next chunk and computes it with one intra-op
thread. torch releases the GIL inside its kernels, so the workers run at the same time, and a
descheduled worker delays only the chunk it holds while the others take the remaining ones.

Each chunk is computed by the same kernels as before, on the same images, so the outputs are those
of computing the chunks one after another.

Example:
    >>> import torch
    >>> parts = torch.arange(10.0).reshape(5, 2).split(2)
    >>> torch.cat(run_chunks(lambda part: part * 2, parts, workers=2)).flatten().tolist()
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _CallerState:
    """The calling thread's torch settings that a chunk's result depends on (all per thread)."""

    grad_enabled: bool
    inference_mode: bool
    autocast: bool
    autocast_dtype: torch.dtype

    @classmethod
    def capture(cls) -> _CallerState:
        return cls(
            grad_enabled=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            autocast=torch.is_autocast_enabled("cpu"),
            autocast_dtype=torch.get_autocast_dtype("cpu"),
        )

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The same settings in the current (worker) thread, for the block."""
        with (
            torch.inference_mode(self.inference_mode),
            torch.set_grad_enabled(self.grad_enabled),
            torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast),
        ):
            yield


def _modes_active() -> bool:
    """Whether a torch function or dispatch mode is active: its stack is the calling thread's."""
    return bool(torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


def _one_intra_op_thread() -> None:
    # torch initialises a thread's intra-op count from the process-wide default on the thread's
    # first parallel call; get_num_threads does that initialisation now, so it cannot undo the 1.
    torch.get_num_threads()
    torch.set_num_threads(1)


def run_chunks(
    network: Callable[[torch.Tensor], torch.Tensor],
    parts: Sequence[torch.Tensor],
    workers: int | None = None,
) -> list[torch.Tensor]:
    """``[network(part) for part in parts]``, computed by up to ``workers`` threads.

    Args:
        network: applied to every part; called from the worker threads, so its forward hooks
            run there too.
        parts: the chunks, in order; the results come back in the same order.
        workers: threads (default: the calling thread's ``torch.get_num_threads()``). Each
            worker computes one part at a time with one intra-op thread.

    With one worker or one part, or while a torch function or dispatch mode is active (such a
    mode belongs to the calling thread), the parts run in the calling thread, one after another.
    Otherwise the workers compute under the calling thread's grad mode, inference mode and CPU
    autocast settings. torch's intra-op thread count is set per thread, and the process-wide
    default that new threads start from is set back to the calling thread's count on return,
    also when a part raises (the first exception is re-raised; parts not yet started are
    dropped). Each call has its own workers, so calls from several threads do not share them.
    """
    before = torch.get_num_threads()
    workers = min(before if workers is None else workers, len(parts))
    if workers <= 1 or _modes_active():
        return [network(part) for part in parts]
    state = _CallerState.capture()

    def compute(part: torch.Tensor) -> torch.Tensor:
        with state.applied():
            return network(part)

    pool = ThreadPoolExecutor(max_workers=workers, initializer=_one_intra_op_thread)
    try:
        futures = [pool.submit(compute, part) for part in parts]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)


__all__ = ["run_chunks"]
