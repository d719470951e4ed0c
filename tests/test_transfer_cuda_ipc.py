"""cuda_ipc with its real GPU memory: bit-exact between two processes on two GPUs (or one), write fences,
dead senders reclaimed; and, on any machine, the clear errors for a missing GPU. The lease
protocol itself is tested on any machine in test_transfer_leases.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from transfer.base import TransportError
from transfer.messages import EncodeResult

# Sender on cuda:0, receiver on cuda:1; on a machine with one GPU both on cuda:0 (CUDA IPC between
# two processes of one GPU: the same protocol, the copy without the link).
GPUS = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RECEIVER = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
SPAWN = mp.get_context("spawn")
WIDTH = 8192  # H*(1+k) of the real model: 2048 * (1 + 3)
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def payload(
    rows: int, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0, cols: int = WIDTH
) -> torch.Tensor:
    """Random bits (NaNs, infs and subnormals included): the wire must move bits, not values."""
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(BITS[dtype])
    bits = torch.randint(info.min, info.max, (rows, cols), generator=g, dtype=BITS[dtype])
    return bits.view(dtype).to(device)


# (rows, cols): empty, odd sizes that leave spans unaligned to the element, 16 MiB and 64 MiB in bf16.
EXACT_CASES = [
    (f"{str(dtype)[6:]}-{r}x{c}", dtype, r, c)
    for dtype in BITS
    for r, c in [(0, WIDTH), (1, 1), (7, 13), (1024, WIDTH), (4096, WIDTH)]
]


def _send_exact_cases(address: str, go) -> None:
    from transfer.cuda_ipc_sender import CudaIpcSender

    torch.cuda.set_device(0)
    with CudaIpcSender(address) as sender:
        for seed, (name, dtype, rows, cols) in enumerate(EXACT_CASES):
            sender.send(EncodeResult(name, "k", (1, 1, 1), payload(rows, "cuda:0", dtype, seed, cols)), timeout=120)
        go.get()


def test_receiver_without_gpu_says_what_to_use_instead() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with pytest.raises(TransportError, match="use the zmq transport"):
        CudaIpcReceiver("tcp://127.0.0.1:*")


def test_invisible_receiver_gpu_is_a_clear_error() -> None:
    from transfer.cuda_ipc_sender import device_with_uuid

    with pytest.raises(TransportError, match="CUDA_VISIBLE_DEVICES"):
        device_with_uuid("GPU-00000000-0000-0000-0000-000000000000")


@pytest.mark.gpu
@GPUS
def test_cuda_ipc_is_bit_exact_between_processes() -> None:
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with CudaIpcReceiver(
        "ipc:///tmp/splitvl-test-cuda-exact.sock", device=RECEIVER, lease_bytes=256 << 20, max_senders=1
    ) as receiver:
        go = SPAWN.Queue()
        proc = SPAWN.Process(target=_send_exact_cases, args=(receiver.address, go), daemon=True)
        proc.start()
        try:
            for seed, (name, dtype, rows, cols) in enumerate(EXACT_CASES):
                msg = receiver.recv(timeout=120)
                assert msg is not None and msg.request_id == name
                got, want = msg.embeddings, payload(rows, "cpu", dtype, seed, cols)
                assert (got.device, got.dtype, got.shape) == (torch.device(RECEIVER), dtype, want.shape), name
                assert torch.equal(got.cpu().view(BITS[dtype]), want.view(BITS[dtype])), f"{name} is not bit-exact"
        finally:
            go.put(1)
            proc.join(30)


def _send_forever(address: str, tag: str) -> None:
    from transfer.cuda_ipc_sender import CudaIpcSender

    torch.cuda.set_device(0)
    sender = CudaIpcSender(address)
    i = 0
    while True:
        sender.send(EncodeResult(f"{tag}-{i}", "k", (1, 1, 1), payload(256, "cuda:0", torch.bfloat16, i)), timeout=60)
        i += 1


@pytest.mark.gpu
@GPUS
def test_dead_sender_does_not_leak_or_corrupt_the_region() -> None:
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with CudaIpcReceiver(
        "ipc:///tmp/splitvl-test-cuda-dead.sock",
        device=RECEIVER,
        lease_bytes=16 << 20,
        max_senders=1,
        lease_timeout=2.0,
    ) as receiver:
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
                assert msg.embeddings.device == torch.device(RECEIVER)
                assert torch.equal(msg.embeddings.cpu().view(torch.int16), want.view(torch.int16))
                checked += 1
            assert receiver.leases_held == 1
        finally:
            second.kill()


def _receive_forever(address: str, seen) -> None:
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with CudaIpcReceiver(address, device=RECEIVER, lease_bytes=16 << 20, max_senders=1) as receiver:
        while True:
            msg = receiver.recv()
            want = payload(256, "cpu", torch.bfloat16, int(msg.request_id[2:]))
            seen.put((msg.request_id, torch.equal(msg.embeddings.cpu().view(torch.int16), want.view(torch.int16))))


@pytest.mark.gpu
@GPUS
def test_sender_survives_receiver_death_and_reattaches(tmp_path) -> None:
    """The receiver process dies with the sender's mapping of its region open; the sender must
    neither crash nor corrupt anything, and must resume with the restarted receiver."""
    from transfer.base import TransportTimeout
    from transfer.cuda_ipc_sender import CudaIpcSender

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
                    sender.send(
                        EncodeResult(f"m-{i}", "k", (1, 1, 1), payload(256, "cuda:0", torch.bfloat16, i)), timeout=0.5
                    )
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
INLINE_CASES = [
    (torch.bfloat16, 0, 8192),
    (torch.float32, 0, 8192),
    (torch.float16, 1024, 1024),
    (torch.bfloat16, 16, 8192),
]


def _send_inline_cases(address: str, go) -> None:
    from transfer.cuda_ipc_sender import CudaIpcSender

    torch.cuda.set_device(0)
    with CudaIpcSender(address) as sender:
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), payload(rows, "cuda:0", dtype, i, cols)), timeout=60)
        go.get()


@pytest.mark.gpu
@GPUS
def test_empty_and_oversized_tensors_arrive_on_the_receivers_gpu() -> None:
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with CudaIpcReceiver(
        "ipc:///tmp/splitvl-test-cuda-inline.sock", device=RECEIVER, lease_bytes=1 << 20, max_senders=1
    ) as receiver:
        go = SPAWN.Queue()
        proc = SPAWN.Process(target=_send_inline_cases, args=(receiver.address, go), daemon=True)
        proc.start()
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            msg = receiver.recv(timeout=120)
            assert msg is not None and msg.request_id == f"m-{i}"
            got, want = msg.embeddings, payload(rows, "cpu", dtype, i, cols)
            assert (got.device, got.dtype, got.shape) == (torch.device(RECEIVER), dtype, want.shape)
            assert torch.equal(got.cpu().view(BITS[dtype]), want.view(BITS[dtype]))
        go.put(1)
        proc.join(30)


SLOW_WRITE_CYCLES = 400_000_000  # ~0.2 s of torch.cuda._sleep on an H100 before each copy


def _send_after_slow_kernel(address: str, go, sent_at, cycles: int, die: bool) -> None:
    from transfer.cuda_ipc_sender import CudaIpcSender

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
@GPUS
def test_device_fence_sends_at_once_and_delivery_waits_for_the_write() -> None:
    """The DATA goes out while the sender's copy is still queued (send() does not wait for it),
    and the receiver delivers the message only once the copy has landed: the tensor holds the
    new bytes, never what the span held before."""
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with CudaIpcReceiver(
        "ipc:///tmp/splitvl-test-cuda-fence.sock", device=RECEIVER, lease_bytes=16 << 20, max_senders=1
    ) as receiver:
        go, sent_at = SPAWN.Queue(), SPAWN.Queue()
        proc = SPAWN.Process(
            target=_send_after_slow_kernel, daemon=True, args=(receiver.address, go, sent_at, SLOW_WRITE_CYCLES, False)
        )
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
@GPUS
def test_sender_killed_before_its_copy_ran_neither_hangs_nor_corrupts(caplog) -> None:
    """The sender dies with its DATA sent and its copy still queued, so its write fence never
    completes. The receiver must not deliver that message (its span holds old bytes), must not
    hang on it, and must serve the next sender once the dead one's lease is reclaimed."""
    from transfer.cuda_ipc_receiver import CudaIpcReceiver

    with CudaIpcReceiver(
        "ipc:///tmp/splitvl-test-cuda-fence-dead.sock",
        device=RECEIVER,
        lease_bytes=16 << 20,
        max_senders=1,
        lease_timeout=2.0,
    ) as receiver:
        go, sent_at = SPAWN.Queue(), SPAWN.Queue()
        doomed = SPAWN.Process(
            target=_send_after_slow_kernel,
            daemon=True,
            args=(receiver.address, go, sent_at, 10 * SLOW_WRITE_CYCLES, True),
        )
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
