"""cuda_ipc: bit-exact between two processes on two GPUs, dead senders reclaimed; and, on any
machine, the clear errors for a missing GPU."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from transfer.base import TransportError
from transfer.messages import EncodeResult

TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
SPAWN = mp.get_context("spawn")


def test_receiver_without_gpu_says_what_to_use_instead() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from transfer.cuda_ipc import CudaIpcReceiver

    with pytest.raises(TransportError, match="zmq or shm"):
        CudaIpcReceiver("tcp://127.0.0.1:*")


def test_invisible_receiver_gpu_is_a_clear_error() -> None:
    from transfer.cuda_ipc import _device_with_uuid

    with pytest.raises(TransportError, match="CUDA_VISIBLE_DEVICES"):
        _device_with_uuid("GPU-00000000-0000-0000-0000-000000000000")


@pytest.mark.gpu
@TWO_GPUS
def test_cuda_ipc_is_bit_exact_between_processes_on_two_gpus() -> None:
    from transfer.bench import cuda_ipc_exact

    results = cuda_ipc_exact("ipc:///tmp/splitvl-test-cuda-exact.sock")
    assert len(results) == 15
    bad = [(name, detail) for name, ok, detail in results if not ok]
    assert not bad, f"not bit-exact: {bad}"


def _send_forever(address: str, tag: str) -> None:
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcSender

    torch.cuda.set_device(0)
    sender = CudaIpcSender(address)
    i = 0
    while True:
        sender.send(EncodeResult(f"{tag}-{i}", "k", (1, 1, 1), payload(256, "cuda:0", torch.bfloat16, i)), timeout=60)
        i += 1


@pytest.mark.gpu
@TWO_GPUS
def test_dead_sender_does_not_leak_or_corrupt_the_region() -> None:
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcReceiver

    with CudaIpcReceiver("ipc:///tmp/splitvl-test-cuda-dead.sock", device="cuda:1", lease_bytes=16 << 20,
                         max_senders=1, lease_timeout=2.0) as receiver:
        first = SPAWN.Process(target=_send_forever, args=(receiver.address, "a"), daemon=True)
        first.start()
        for _ in range(5):
            assert receiver.recv(timeout=120).request_id.startswith("a-")
        os.kill(first.pid, signal.SIGKILL)  # mid-copy, most likely
        first.join(30)
        second = SPAWN.Process(target=_send_forever, args=(receiver.address, "b"), daemon=True)
        second.start()
        try:
            deadline = time.monotonic() + 120
            checked = 0
            while checked < 20:
                msg = receiver.recv(timeout=max(0.0, deadline - time.monotonic()))
                assert msg is not None, "the second sender never got the reclaimed lease"
                if not msg.request_id.startswith("b-"):
                    continue
                i = int(msg.request_id[2:])
                want = payload(256, "cpu", torch.bfloat16, i)
                assert msg.embeddings.device == torch.device("cuda:1")
                assert torch.equal(msg.embeddings.cpu().view(torch.int16), want.view(torch.int16))
                checked += 1
            assert receiver.leases_held == 1
        finally:
            second.kill()


def _receive_forever(address: str, seen) -> None:
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcReceiver

    with CudaIpcReceiver(address, device="cuda:1", lease_bytes=16 << 20, max_senders=1) as receiver:
        while True:
            msg = receiver.recv()
            want = payload(256, "cpu", torch.bfloat16, int(msg.request_id[2:]))
            seen.put((msg.request_id, torch.equal(msg.embeddings.cpu().view(torch.int16), want.view(torch.int16))))


@pytest.mark.gpu
@TWO_GPUS
def test_sender_survives_receiver_death_and_reattaches(tmp_path) -> None:
    """The receiver process dies with the sender's mapping of its region open; the sender must
    neither crash nor corrupt anything, and must resume with the restarted receiver."""
    from transfer.base import TransportTimeout
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcSender

    address = f"ipc://{tmp_path}/cuda-restart.sock"
    seen = SPAWN.Queue()
    torch.cuda.set_device(0)
    first = SPAWN.Process(target=_receive_forever, args=(address, seen), daemon=True)
    first.start()
    with CudaIpcSender(address) as sender:
        i = 0

        def send_until_seen() -> tuple[str, bool]:
            nonlocal i
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), payload(256, "cuda:0", torch.bfloat16, i)), timeout=0.5)
                    i += 1
                except TransportTimeout:
                    pass
                if not seen.empty():
                    return seen.get()
            raise AssertionError("nothing got through")

        assert send_until_seen()[1]
        os.kill(first.pid, signal.SIGKILL)
        first.join(30)
        # A fresh report queue: the killed receiver may have died inside Queue.put, holding its lock.
        seen = SPAWN.Queue()
        second = SPAWN.Process(target=_receive_forever, args=(address, seen), daemon=True)
        second.start()
        try:
            request_id, intact = send_until_seen()
            assert intact, f"{request_id} arrived corrupted after the restart"
        finally:
            second.kill()


# Travel inline, not through the region: empty tensors, and one larger than the 1 MiB test lease.
INLINE_CASES = [(torch.bfloat16, 0, 8192), (torch.float32, 0, 8192), (torch.float16, 1024, 1024), (torch.bfloat16, 16, 8192)]


def _send_inline_cases(address: str, go) -> None:
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcSender

    torch.cuda.set_device(0)
    with CudaIpcSender(address) as sender:
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), payload(rows, "cuda:0", dtype, i, cols)), timeout=60)
        go.get()


@pytest.mark.gpu
@TWO_GPUS
def test_empty_and_oversized_tensors_arrive_on_the_receivers_gpu() -> None:
    from transfer.bench import BITS, payload
    from transfer.cuda_ipc import CudaIpcReceiver

    with CudaIpcReceiver("ipc:///tmp/splitvl-test-cuda-inline.sock", device="cuda:1", lease_bytes=1 << 20,
                         max_senders=1) as receiver:
        go = SPAWN.Queue()
        proc = SPAWN.Process(target=_send_inline_cases, args=(receiver.address, go), daemon=True)
        proc.start()
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            msg = receiver.recv(timeout=120)
            assert msg is not None and msg.request_id == f"m-{i}"
            got, want = msg.embeddings, payload(rows, "cpu", dtype, i, cols)
            assert (got.device, got.dtype, got.shape) == (torch.device("cuda:1"), dtype, want.shape)
            assert torch.equal(got.cpu().view(BITS[dtype]), want.view(BITS[dtype]))
        go.put(1)
        proc.join(30)


SLOW_WRITE_CYCLES = 400_000_000  # ~0.2 s of torch.cuda._sleep on an H100 before each copy


def _send_after_slow_kernel(address: str, go, sent_at, cycles: int, die: bool) -> None:
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcSender

    torch.cuda.set_device(0)
    with CudaIpcSender(address) as sender:
        # Attach and map the region first: the first write into a lease maps it (tens of ms).
        sender.send(EncodeResult("warm", "k", (1, 1, 1), payload(256, "cuda:0", torch.bfloat16, 99)), timeout=60)
        go.get()
        for i in range(1 if die else 3):
            tensor = payload(256, "cuda:0", torch.bfloat16, i)
            torch.cuda.synchronize()
            torch.cuda._sleep(cycles)  # the copy queues behind it on the same stream
            start = time.monotonic()
            sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), tensor), timeout=60)
            sent_at.put((start, time.monotonic()))
            if die:  # the DATA is out, the copy has not run: die before it does
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            go.get()


@pytest.mark.gpu
@TWO_GPUS
def test_device_fence_sends_at_once_and_delivery_waits_for_the_write() -> None:
    """The DATA goes out while the sender's copy is still queued (send() does not wait for it),
    and the receiver delivers the message only once the copy has landed: the tensor holds the
    new bytes, never what the span held before."""
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcReceiver

    with CudaIpcReceiver("ipc:///tmp/splitvl-test-cuda-fence.sock", device="cuda:1", lease_bytes=16 << 20,
                         max_senders=1) as receiver:
        go, sent_at = SPAWN.Queue(), SPAWN.Queue()
        proc = SPAWN.Process(target=_send_after_slow_kernel, daemon=True,
                             args=(receiver.address, go, sent_at, SLOW_WRITE_CYCLES, False))
        proc.start()
        try:
            assert receiver.recv(timeout=120).request_id == "warm"
            go.put(1)
            for i in range(3):
                msg = receiver.recv(timeout=120)
                delivered = time.monotonic()
                assert msg is not None and msg.request_id == f"m-{i}"
                start, returned = sent_at.get(timeout=60)
                assert returned - start < 0.05, "send() waited for the copy instead of naming its fence"
                assert delivered - returned > 0.05, "delivered before the sender's copy could have run"
                got = msg.embeddings.cpu()
                assert torch.equal(got.view(torch.int16), payload(256, "cpu", torch.bfloat16, i).view(torch.int16))
                go.put(1)
        finally:
            proc.join(30)


@pytest.mark.gpu
@TWO_GPUS
def test_sender_killed_before_its_copy_ran_neither_hangs_nor_corrupts(caplog) -> None:
    """The sender dies with its DATA sent and its copy still queued, so its write fence never
    completes. The receiver must not deliver that message (its span holds old bytes), must not
    hang on it, and must serve the next sender once the dead one's lease is reclaimed."""
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcReceiver

    with CudaIpcReceiver("ipc:///tmp/splitvl-test-cuda-fence-dead.sock", device="cuda:1", lease_bytes=16 << 20,
                         max_senders=1, lease_timeout=2.0) as receiver:
        go, sent_at = SPAWN.Queue(), SPAWN.Queue()
        doomed = SPAWN.Process(target=_send_after_slow_kernel, daemon=True,
                               args=(receiver.address, go, sent_at, 10 * SLOW_WRITE_CYCLES, True))
        doomed.start()
        assert receiver.recv(timeout=120).request_id == "warm"
        go.put(1)
        sent_at.get(timeout=120)
        assert receiver.recv(timeout=0.5) is None, "delivered a message whose copy had not run"
        doomed.join(30)
        assert doomed.exitcode == -signal.SIGKILL
        second = SPAWN.Process(target=_send_forever, args=(receiver.address, "b"), daemon=True)
        second.start()
        try:
            for _ in range(5):
                msg = receiver.recv(timeout=120)
                assert msg is not None and msg.request_id.startswith("b-"), f"got {msg and msg.request_id}"
                want = payload(256, "cpu", torch.bfloat16, int(msg.request_id[2:]))
                assert torch.equal(msg.embeddings.cpu().view(torch.int16), want.view(torch.int16))
            assert "the lease was reclaimed before its writes landed" in caplog.text
        finally:
            second.kill()


BATCH_CASES = [(torch.bfloat16, 1024, 8192), (torch.float16, 7, 13), (torch.float32, 300, 1024), (torch.bfloat16, 0, 8192),
               (torch.float32, 1, 1), (torch.bfloat16, 4096, 8192), (torch.float16, 513, 2048), (torch.bfloat16, 1, 8192)]


def _send_batches(address: str, go) -> None:
    from transfer.bench import payload
    from transfer.cuda_ipc import CudaIpcSender

    torch.cuda.set_device(0)
    with CudaIpcSender(address) as sender:
        for round_ in range(3):  # the spans of each batch land at other places of the ring
            sender.send_many([EncodeResult(f"m-{round_}-{i}", "k", (1, 1, 1), payload(rows, "cuda:0", dtype, 10 * round_ + i, cols))
                              for i, (dtype, rows, cols) in enumerate(BATCH_CASES)], timeout=60)
        go.get()


@pytest.mark.gpu
@TWO_GPUS
def test_send_many_is_bit_exact_between_processes_on_two_gpus() -> None:
    """Batches mixing dtypes and sizes (an empty tensor and one bigger than half the lease among
    them): the receiver copies each batch's span out in one piece and hands out views of it;
    every tensor must be exact, on the receiver's GPU, in order."""
    from transfer.bench import BITS, payload
    from transfer.cuda_ipc import CudaIpcReceiver

    with CudaIpcReceiver("ipc:///tmp/splitvl-test-cuda-batch.sock", device="cuda:1", lease_bytes=96 << 20,
                         max_senders=1) as receiver:
        go = SPAWN.Queue()
        proc = SPAWN.Process(target=_send_batches, args=(receiver.address, go), daemon=True)
        proc.start()
        try:
            for round_ in range(3):
                for i, (dtype, rows, cols) in enumerate(BATCH_CASES):
                    msg = receiver.recv(timeout=120)
                    assert msg is not None and msg.request_id == f"m-{round_}-{i}"
                    got, want = msg.embeddings, payload(rows, "cpu", dtype, 10 * round_ + i, cols)
                    assert (got.device, got.dtype, got.shape) == (torch.device("cuda:1"), dtype, want.shape)
                    assert torch.equal(got.cpu().view(BITS[dtype]), want.view(BITS[dtype])), msg.request_id
            assert receiver.stats.rejected == 0
        finally:
            go.put(1)
            proc.join(30)
