"""zmq transport between real processes over real sockets: exact delivery, hostile input,
peer restarts and backpressure."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time

import msgpack
import pytest
import torch

from tests.net import free_tcp_address
from transfer.base import TransportTimeout
from transfer.codec import Limits, encode_message
from transfer.messages import PROTOCOL_VERSION, EncodeError, EncodeJob, EncodeResult, HealthPong
from transfer.registry import make_receiver, make_sender
from transfer.zmq_transport import ZmqReceiver, ZmqSender

# Peers start from a clean forkserver (nothing inherited from pytest) that has torch imported
# already, so each one costs ~0.1 s instead of a fresh interpreter's ~1.5 s.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "zmq", "msgpack", "transfer.zmq_transport"])
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def expected_messages() -> list:
    """The same deterministic messages in every process: bit patterns of every kind."""
    msgs: list = []
    g = torch.Generator().manual_seed(1234)
    for dtype in DTYPES:
        for rows, cols in [(0, 64), (1, 1), (17, 33), (256, 2048)]:
            info = torch.iinfo(BITS[dtype])
            bits = torch.randint(info.min, info.max, (rows, cols), generator=g, dtype=BITS[dtype])
            msgs.append(EncodeResult(f"r-{dtype}-{rows}", "key", (1, 2, 2), bits.view(dtype)))
    msgs.append(
        EncodeResult(
            "r-64mib",
            "key",
            (1, 64, 64),
            torch.arange(4096 * 8192, dtype=torch.int16).view(torch.bfloat16).reshape(4096, 8192),
        )
    )
    msgs.append(EncodeJob("r-job", "key", bytes(range(256)) * 10, "tcp://127.0.0.1:1", {"max_pixels": 1 << 20}))
    msgs.append(EncodeError("r-err", "key", "bad_image", "cannot identify image file"))
    msgs.append(HealthPong(3, 1.5, "enc-0", 2, 1, True))
    return msgs


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, EncodeResult):
        return (
            (a.request_id, a.image_key, a.grid_thw) == (b.request_id, b.image_key, b.grid_thw)
            and a.embeddings.dtype == b.embeddings.dtype
            and torch.equal(a.embeddings.view(BITS[a.embeddings.dtype]), b.embeddings.view(BITS[b.embeddings.dtype]))
        )
    return a == b


# ----------------------------------------------------------------------- peer processes


def _send_expected(address: str) -> None:
    with make_sender("zmq", address) as sender:
        for msg in expected_messages():
            sender.send(msg, timeout=30)
        time.sleep(0.5)  # LINGER is 0: let the last frames leave before the socket closes


def _send_raw(address: str, messages: list[list[bytes]]) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(address)
    for frames in messages:
        sock.send_multipart(frames)
    time.sleep(0.5)
    sock.close()


def _receive_forever(address: str, seen) -> None:
    with ZmqReceiver(address) as receiver:
        while True:
            msg = receiver.recv()
            seen.put(msg.request_id)


def _send_forever(address: str, tag: str, mib: int) -> None:
    with ZmqSender(address) as sender:
        payload = torch.zeros(mib * 256, 1024, dtype=torch.float32)
        i = 0
        while True:
            sender.send(EncodeResult(f"{tag}-{i}", "key", (1, 1, 1), payload), timeout=30)
            i += 1


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_up() -> None:
    """Touch what the first message touches once (torch's CPU kernels and thread pool, the codec),
    so the RSS growth measured next is the messages' memory alone."""
    encode_message(EncodeResult("warm", "key", (1, 1, 1), torch.full((1024, 1024), 1.0)))


def _flood(address: str, report, go) -> None:
    """Send fresh 4 MiB messages to a stalled receiver until it pushes back."""
    with ZmqSender(address, sndhwm=2) as sender:
        _warm_up()
        start = _rss()
        sent = 0
        for i in range(48):
            payload = torch.full((1024, 1024), float(i), dtype=torch.float32)
            try:
                sender.send(EncodeResult(f"flood-{i}", "key", (1, 1, 1), payload), timeout=0.5)
            except TransportTimeout:
                break
            sent += 1
        report.put((sent, _rss() - start))
        go.wait(30)  # the receiver drains; a send must now get through
        sender.send(EncodeResult("after", "key", (1, 1, 1), torch.zeros(1, 1)), timeout=10)
        time.sleep(0.5)


def _send_numbered(address: str, n: int) -> None:
    with ZmqSender(address) as sender:
        payload = torch.zeros(1024, 4096)
        for i in range(n):
            sender.send(EncodeResult(f"n-{i}", "k", (1, 1, 1), payload), timeout=60)
        time.sleep(1.0)


def _start(target, *args):
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_messages_arrive_bit_exact_across_processes(scheme: str, tmp_path) -> None:
    address = "tcp://127.0.0.1:*" if scheme == "tcp" else f"ipc://{tmp_path}/results.sock"
    with make_receiver("zmq", address) as receiver:
        proc = _start(_send_expected, receiver.address)
        got = [receiver.recv(timeout=30) for _ in expected_messages()]
        proc.join(10)
    assert all(m is not None for m in got), "a message never arrived"
    for want, have in zip(expected_messages(), got):
        assert same(want, have), f"{want.request_id} changed on the wire"


def test_bad_messages_are_logged_and_dropped_while_receiver_keeps_serving(caplog) -> None:
    good = [bytes(f) for f in encode_message(EncodeError("good", "k", "c", "m"))]
    result_frames = [
        bytes(f) for f in encode_message(EncodeResult("r", "k", (1, 1, 1), torch.ones(4, 8, dtype=torch.bfloat16)))
    ]
    header = msgpack.unpackb(result_frames[0])

    def variant(**changes) -> list[bytes]:
        return [msgpack.packb({**header, **changes})] + result_frames[1:]

    bad_shape = {**header, "frames": [{**header["frames"][0], "shape": [1 << 16, 1 << 16]}]}
    bad = {
        "garbage": ([b"\x00\xff garbage"], "not valid msgpack"),
        "truncated": ([result_frames[0][:-4], result_frames[1]], "not valid msgpack"),
        "wrong version": (variant(v=PROTOCOL_VERSION + 7), "unsupported protocol version"),
        "unknown type": (variant(type="shutdown_now"), "unknown message type"),
        "bad dtype": (
            [msgpack.packb({**header, "frames": [{**header["frames"][0], "dtype": "float64"}]}), result_frames[1]],
            "not allowed",
        ),
        "length mismatch": ([result_frames[0], result_frames[1][:-2]], "needs 64"),
        "oversized": ([msgpack.packb(bad_shape), result_frames[1]], "limit"),
        "frame count": (result_frames + [b"extra"], "describes 1 data frames, got 2"),
    }
    stream = []
    for frames, _ in bad.values():
        stream += [frames, good]
    caplog.set_level(logging.WARNING, logger="transfer.zmq_transport")
    with ZmqReceiver("tcp://127.0.0.1:*") as receiver:
        proc = _start(_send_raw, receiver.address, stream)
        got = [receiver.recv(timeout=30) for _ in bad]
        proc.join(10)
        assert got == [EncodeError("good", "k", "c", "m")] * len(bad)
        assert receiver.stats.rejected == len(bad)
    for name, (_, reason) in bad.items():
        assert reason in caplog.text, f"no logged reason for {name}"


def test_frame_over_size_limit_is_dropped_by_zmq_and_service_continues() -> None:
    small = Limits(max_frame_bytes=1 << 20)
    huge = encode_message(EncodeResult("huge", "k", (1, 1, 1), torch.zeros(1024, 1024, dtype=torch.float32)))
    with ZmqReceiver("tcp://127.0.0.1:*", limits=small) as receiver:
        proc = _start(_send_raw, receiver.address, [[bytes(f) for f in huge]])
        assert receiver.recv(timeout=1) is None  # the 4 MiB frame never reaches the codec
        proc.join(10)
        ok = [bytes(f) for f in encode_message(EncodeError("ok", "k", "c", "m"))]
        proc = _start(_send_raw, receiver.address, [ok])
        assert receiver.recv(timeout=30) == EncodeError("ok", "k", "c", "m")
        proc.join(10)


def test_sender_recovers_when_receiver_restarts() -> None:
    address = free_tcp_address()
    # One report queue per receiver: a process killed inside Queue.put can leave the queue's
    # lock held forever, and the restarted receiver's reports would then never arrive (this
    # test failed that way under load, with the transport working).
    seen = SPAWN.Queue()
    first = _start(_receive_forever, address, seen)
    with ZmqSender(address) as sender:
        payload = torch.ones(64, 64, dtype=torch.bfloat16)
        i = 0

        def send_until_seen(deadline: float, seen, at_least: int = 0) -> str:
            """Send numbered messages until the receiver reports one numbered >= at_least
            (a message queued before a restart may or may not arrive: at most once)."""
            nonlocal i
            while time.monotonic() < deadline:
                try:
                    sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), payload), timeout=0.2)
                    i += 1
                except TransportTimeout:
                    pass
                while not seen.empty():
                    got = seen.get()
                    if got.startswith("m-") and int(got[2:]) >= at_least:
                        return got
            raise AssertionError("no message got through")

        send_until_seen(time.monotonic() + 60, seen)
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        # While nobody listens, send() pushes back within its timeout instead of hanging.
        start = time.monotonic()
        with pytest.raises(TransportTimeout):
            for _ in range(50):
                sender.send(EncodeResult("void", "k", (1, 1, 1), payload), timeout=0.2)
        assert time.monotonic() - start < 10
        before = i
        seen_again = SPAWN.Queue()
        second = _start(_receive_forever, address, seen_again)
        try:
            send_until_seen(time.monotonic() + 60, seen_again, at_least=before)
        finally:
            second.kill()


def test_receiver_recovers_when_sender_dies_mid_message() -> None:
    with ZmqReceiver("tcp://127.0.0.1:*") as receiver:
        first = _start(_send_forever, receiver.address, "one", 32)
        for _ in range(2):
            assert receiver.recv(timeout=30).request_id.startswith("one-")
        os.kill(first.pid, signal.SIGKILL)  # almost surely inside a 32 MiB message
        first.join(10)
        second = _start(_send_forever, receiver.address, "two", 1)
        try:
            deadline = time.monotonic() + 30
            while True:
                msg = receiver.recv(timeout=max(0.0, deadline - time.monotonic()))
                assert msg is not None, "the restarted sender's messages never arrived"
                if msg.request_id.startswith("two-"):
                    break
            assert receiver.stats.rejected == 0  # a torn message is never handed to the codec
        finally:
            second.kill()


def test_stalled_receiver_bounds_sender_memory() -> None:
    report, go = SPAWN.Queue(), SPAWN.Event()
    with ZmqReceiver("tcp://127.0.0.1:*", rcvhwm=2) as receiver:  # bound, never read: stalled
        proc = _start(_flood, receiver.address, report, go)
        sent, growth = report.get(timeout=60)
        # sndhwm + rcvhwm messages, plus the one in zmq's I/O thread and what the kernel's
        # loopback buffers absorb (a few MiB); without the bound all 48 would be queued.
        assert sent <= 12, f"sender queued {sent} messages for a stalled receiver"
        assert growth <= (sent + 2) * (4 << 20) + (16 << 20), f"sender grew {growth >> 20} MiB"
        got = [receiver.recv(timeout=10) for _ in range(sent)]
        assert [m.request_id for m in got] == [f"flood-{i}" for i in range(sent)]
        go.set()
        assert receiver.recv(timeout=30).request_id == "after"
        proc.join(10)


def test_long_stall_loses_no_message() -> None:
    """A receiver that stops reading for 8 s is slow, not dead: the blocked sender's messages
    must all arrive afterwards (zmq heartbeats with a short timeout used to drop them)."""
    with ZmqReceiver("tcp://127.0.0.1:*") as receiver:
        proc = _start(_send_numbered, receiver.address, 30)
        first = receiver.recv(timeout=30)
        time.sleep(8)
        got = [first] + [receiver.recv(timeout=10) for _ in range(29)]
        proc.join(10)
    assert [m.request_id if m else None for m in got] == [f"n-{i}" for i in range(30)]
