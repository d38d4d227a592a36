"""CPU inference with the chunks spread over threads: the plain result, torch's thread count kept,
per-thread torch settings carried over; and the benchmark's busy processes, started and stopped."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from comdefend import ComDefend, ComDefendConfig
from comdefend.models import comdefend as comdefend_module
from comdefend.models.parallel import run_chunks
from support import load_module

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "purify.py"


@pytest.fixture()
def model() -> ComDefend:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ComDefend(ComDefendConfig(preset="normal"), patch_size=8).eval()


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 channels x 8 x 8 pixels x 4 bytes = 64 KiB per image: chunks of 2 images.
    monkeypatch.setattr(comdefend_module, "CPU_CHUNK_BYTES", 2 * 256 * 8 * 8 * 4)


@pytest.fixture()
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def unchunked(model: ComDefend, x: torch.Tensor, mode: str = "full") -> torch.Tensor:
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(comdefend_module, "CPU_CHUNK_BYTES", 2**62)
        return model.purify(x, mode=mode)  # type: ignore[arg-type]


def threads_seen_by_a_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.usefixtures("small_chunks", "two_threads")
@pytest.mark.parametrize("images", [1, 2, 3, 5, 7])
def test_same_output_as_the_unchunked_pass(model: ComDefend, images: int) -> None:
    x = torch.rand(images, 3, 8, 8, generator=torch.Generator().manual_seed(images))
    with torch.no_grad():
        fast = model.purify(x)
    assert torch.equal(fast, unchunked(model, x))


@pytest.mark.usefixtures("small_chunks", "two_threads")
def test_patch_mode_with_an_odd_number_of_patches(model: ComDefend) -> None:
    x = torch.rand(1, 3, 8, 40)  # five 8x8 patches: chunks of 2 and 3
    with torch.no_grad():
        fast = model.purify(x, mode="patch")
    assert torch.equal(fast, unchunked(model, x, mode="patch"))


@pytest.mark.usefixtures("small_chunks", "two_threads")
def test_chunks_run_in_workers_with_one_intra_op_thread(model: ComDefend) -> None:
    seen: list[tuple[int, int]] = []
    model.encoder.register_forward_pre_hook(
        lambda *_: seen.append((threading.get_ident(), torch.get_num_threads()))
    )
    with torch.no_grad():
        model.purify(torch.rand(8, 3, 8, 8))
    assert len(seen) == 4 and {count for _, count in seen} == {1}
    assert threading.get_ident() not in {ident for ident, _ in seen}
    assert torch.get_num_threads() == 2 and threads_seen_by_a_new_thread() == 2


@pytest.mark.usefixtures("small_chunks", "two_threads")
def test_thread_count_restored_after_an_exception_inside(model: ComDefend) -> None:
    def fail_on_three(_: torch.nn.Module, args: tuple[torch.Tensor]) -> None:
        if args[0].shape[0] == 3:
            raise RuntimeError("chunk failed")

    model.decoder.register_forward_pre_hook(fail_on_three)
    with pytest.raises(RuntimeError, match="chunk failed"), torch.no_grad():
        model.purify(torch.rand(5, 3, 8, 8))
    assert torch.get_num_threads() == 2 and threads_seen_by_a_new_thread() == 2


@pytest.mark.usefixtures("two_threads")
def test_run_chunks_keeps_order_and_restores_threads_on_error() -> None:
    parts = torch.arange(9.0).split(2)
    assert torch.equal(torch.cat(run_chunks(lambda part: part + 1, parts)), torch.arange(1.0, 10))

    def fail(part: torch.Tensor) -> torch.Tensor:
        if float(part[0]) == 4:
            raise ValueError("bad part")
        return part

    with pytest.raises(ValueError, match="bad part"):
        run_chunks(fail, parts)
    assert torch.get_num_threads() == 2 and threads_seen_by_a_new_thread() == 2


@pytest.mark.usefixtures("two_threads")
def test_workers_take_the_callers_torch_settings() -> None:
    parts = torch.rand(6, 4).split(2)
    weight = torch.rand(4, 4, requires_grad=True)

    def network(part: torch.Tensor) -> torch.Tensor:
        return part @ weight

    with torch.no_grad():
        assert not any(out.requires_grad for out in run_chunks(network, parts))
    with torch.inference_mode():
        assert all(out.is_inference() for out in run_chunks(network, parts))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {out.dtype for out in run_chunks(network, parts)} == {torch.bfloat16}
    # autograd records across the workers: the gradient is that of one pass
    torch.cat(run_chunks(network, parts)).sum().backward()
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, torch.cat(parts).sum(0)[:, None].expand(4, 4))


@pytest.mark.usefixtures("two_threads")
def test_one_worker_or_an_active_mode_runs_in_the_calling_thread() -> None:
    idents: list[int] = []

    def network(part: torch.Tensor) -> torch.Tensor:
        idents.append(threading.get_ident())
        return part

    parts = torch.rand(6).split(2)
    run_chunks(network, parts, workers=1)
    with TorchFunctionMode():
        run_chunks(network, parts)
    assert set(idents) == {threading.get_ident()}


@pytest.mark.usefixtures("small_chunks", "two_threads")
def test_bf16_result_does_not_depend_on_the_workers(model: ComDefend) -> None:
    bf16 = ComDefend(model.config, precision="bf16").eval()
    bf16.load_state_dict(model.state_dict())
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        fast = bf16.purify(x)
        torch.set_num_threads(1)  # one worker: the chunks in this thread, one after another
        in_sequence = bf16.purify(x)
    assert torch.equal(fast, in_sequence)


@pytest.mark.usefixtures("small_chunks", "two_threads")
def test_calls_from_several_threads(model: ComDefend) -> None:
    inputs = [torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    expected = [unchunked(model, x) for x in inputs]
    outputs: dict[int, torch.Tensor] = {}

    def purify(index: int) -> None:
        with torch.no_grad():
            outputs[index] = model.purify(inputs[index])

    threads = [threading.Thread(target=purify, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(outputs[i], expected[i]) for i in range(3))
    assert torch.get_num_threads() == 2 and threads_seen_by_a_new_thread() == 2


def _load_benchmark() -> object:
    return load_module(BENCHMARK, "purify_benchmark")


@pytest.mark.parametrize("stop", ["return", "interrupt"])
def test_busy_processes_start_and_stop(stop: str) -> None:
    busy_processes: Callable = _load_benchmark().busy_processes  # type: ignore[attr-defined]
    sigterm = signal.getsignal(signal.SIGTERM)
    started = []
    with pytest.raises(KeyboardInterrupt) if stop == "interrupt" else nullcontext():
        with busy_processes(2) as processes:
            started = list(processes)
            assert len(started) == 2 and all(p.poll() is None for p in started)
            if stop == "interrupt":
                raise KeyboardInterrupt
    assert len(started) == 2 and all(p.returncode is not None for p in started)  # killed, reaped
    assert signal.getsignal(signal.SIGTERM) == sigterm
