"""cuda_ipc's lease protocol between real processes over real sockets, with its GPU memory stood
in for by host memory (tests/region_hooks.py): exact delivery through recycled spans,
backpressure, dead and restarted peers, write fences, hostile control messages."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time

import msgpack
import pytest
import torch

from tests.net import free_tcp_address
from tests.region_hooks import HeldFences, HostIpcReceiver, HostIpcSender, HostWriter, RawPeer, ctrl, deliver
from transfer.base import TransportTimeout
from transfer.codec import encode_message
from transfer.leases import Ring
from transfer.messages import PROTOCOL_VERSION, EncodeError, EncodeJob, EncodeResult

# Peers start from a clean forkserver (nothing inherited from pytest) that has torch imported
# already, so each one costs far less than a fresh interpreter.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "zmq", "msgpack", "tests.region_hooks"])
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
KIB = 1024


def pattern(i: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Distinct random bits per message, so a recycled span that leaked old data shows up."""
    g = torch.Generator().manual_seed(i)
    info = torch.iinfo(BITS[dtype])
    return torch.randint(info.min, info.max, (rows, cols), generator=g, dtype=BITS[dtype]).view(dtype)


def stream(n: int) -> list:
    """n messages cycling through dtypes and sizes; some larger than the 256 KiB test lease."""
    sizes = [(0, 16), (1, 1), (63, 65), (128, 512), (100, 1024), (300, 1024)]
    dtypes = list(BITS)
    out = []
    for i in range(n):
        rows, cols = sizes[i % len(sizes)]
        out.append(EncodeResult(f"m-{i}", "key", (1, 1, 1), pattern(i, rows, cols, dtypes[i % 3])))
    out.append(EncodeJob("job", "key", b"\x89PNG" * 1000, "tcp://127.0.0.1:1", {"max_pixels": 1 << 20}))
    out.append(EncodeError("err", "key", "bad_image", "broken"))
    return out


def same(a, b) -> bool:
    if isinstance(a, EncodeResult):
        return (
            type(b) is EncodeResult
            and a.request_id == b.request_id
            and a.embeddings.dtype == b.embeddings.dtype
            and torch.equal(a.embeddings.view(BITS[a.embeddings.dtype]), b.embeddings.view(BITS[b.embeddings.dtype]))
        )
    return a == b


def numbered(tag: str, i: int) -> EncodeResult:
    return EncodeResult(f"{tag}-{i}", "key", (1, 1, 1), pattern(i, 64, 512, torch.float32))  # 128 KiB


def intact(msg: EncodeResult) -> bool:
    tag, i = msg.request_id.split("-")
    return same(msg, numbered(tag, int(i)))


# ------------------------------------------------------------------------ peer processes


def _send_stream(address: str, n: int) -> None:
    with HostIpcSender(address) as sender:
        for msg in stream(n):
            sender.send(msg, timeout=30)
        time.sleep(0.5)


def _send_forever(address: str, tag: str) -> None:
    sender = HostIpcSender(address)
    i = 0
    while True:
        sender.send(numbered(tag, i), timeout=60)
        i += 1


def _receive_forever(address: str, seen) -> None:
    with HostIpcReceiver(address, lease_bytes=256 * KIB, max_senders=1) as receiver:
        while True:
            msg = receiver.recv()
            seen.put((msg.request_id, intact(msg)))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flood(address: str, report) -> None:
    with HostIpcSender(address) as sender:
        encode_message(EncodeResult("warm", "key", (1, 1, 1), torch.full((256, 1024), 1.0)))  # first-use costs
        start, sent = _rss(), 0
        for i in range(200):
            try:
                sender.send(EncodeResult(f"f-{i}", "key", (1, 1, 1), torch.full((256, 1024), float(i))), timeout=0.5)
            except TransportTimeout:
                break
            sent += 1
        report.put((sent, _rss() - start))


def _start(target, *args):
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


# ------------------------------------------------------------------------------- delivery


def test_stream_is_bit_exact_and_spans_are_recycled() -> None:
    """~10 MiB through a 256 KiB lease: every span is reused many times, and none is written
    again before the receiver read it (each message has its own bits)."""
    n = 60
    with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=2) as receiver:
        proc = _start(_send_stream, receiver.address, n)
        got = [receiver.recv(timeout=30) for _ in range(n + 2)]
        proc.join(10)
        assert receiver.stats.rejected == 0
    for want, have in zip(stream(n), got, strict=True):
        assert have is not None and same(want, have), f"{want.request_id} changed on the way"


def test_ring_never_hands_out_a_span_before_it_is_freed() -> None:
    ring = Ring(1024)
    assert [ring.alloc(seq, 256) for seq in (1, 2, 3)] == [0, 256, 512]
    assert ring.alloc(4, 512) is None  # only 256 bytes left at the end
    ring.free(2)  # not the oldest: nothing comes back yet (span 1 is still being read)
    assert ring.alloc(4, 512) is None
    ring.free(1)
    assert ring.alloc(4, 512) == 0  # wraps to the start, over spans 1 and 2
    assert ring.alloc(5, 256) is None  # span 3 is still live
    ring.free(99)  # a seq it never gave out changes nothing
    for seq in (3, 4):
        ring.free(seq)
    assert not ring.live and ring.alloc(6, 1024) == 0


def test_inline_tensors_arrive_on_the_receivers_device() -> None:
    """Empty tensors and those larger than the lease travel as zmq frames; they still come out
    on the region's device (a stand-in device here; test_transfer_cuda_ipc checks cuda)."""
    cases = [(torch.bfloat16, 0, 16), (torch.float16, 300, 1024)]  # 600 KiB > the 256 KiB lease
    with (
        HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver,
        HostIpcSender(receiver.address) as sender,
    ):
        receiver._region.device = torch.device("meta")
        for i, (dtype, rows, cols) in enumerate(cases):
            got = deliver(receiver, sender, EncodeResult(f"m-{i}", "key", (1, 1, 1), pattern(i, rows, cols, dtype)))
            emb = got.embeddings
            assert (emb.device.type, emb.dtype, tuple(emb.shape)) == ("meta", dtype, (rows, cols))
        receiver._region.device = torch.device("cpu")
        for i, (dtype, rows, cols) in enumerate(cases):
            want = EncodeResult(f"n-{i}", "key", (1, 1, 1), pattern(i, rows, cols, dtype))
            sender.send(want, timeout=5)
            got = receiver.recv(timeout=5)
            assert same(want, got)


def test_stalled_receiver_pushes_back_and_sender_memory_stays_bounded() -> None:
    report = SPAWN.Queue()
    with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=1024 * KIB, max_senders=1) as receiver:
        proc = _start(_flood, receiver.address, report)
        got, deadline = [], time.monotonic() + 10
        while receiver.leases_held == 0 and time.monotonic() < deadline:
            msg = receiver.recv(timeout=0.05)  # serve the attach (and maybe a first message) ...
            got += [msg] if msg else []
        sent, growth = report.get(timeout=60)  # ... then stall: never read while it floods
        # A 1 MiB lease holds one 1 MiB message; the sender waits for its span to come back.
        assert sent - len(got) <= 1, f"sender accepted {sent} messages for a stalled receiver"
        assert growth < 16 << 20, f"sender grew {growth >> 20} MiB"
        got += [receiver.recv(timeout=10) for _ in range(sent - len(got))]
        assert [m.request_id for m in got] == [f"f-{i}" for i in range(sent)]
        proc.join(10)


# ------------------------------------------------------------------------- peers that go


def test_dead_sender_lease_is_reclaimed_and_region_stays_intact(caplog) -> None:
    caplog.set_level(logging.INFO, logger="transfer.cuda_ipc_receiver")
    with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1, lease_timeout=1.0) as receiver:
        first = _start(_send_forever, receiver.address, "a")
        for _ in range(3):
            assert receiver.recv(timeout=30).request_id.startswith("a-")
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        second = _start(_send_forever, receiver.address, "b")  # needs the only lease
        try:
            deadline = time.monotonic() + 30
            while True:
                msg = receiver.recv(timeout=max(0.0, deadline - time.monotonic()))
                assert msg is not None, "the second sender never got the reclaimed lease"
                if msg.request_id.startswith("b-"):
                    break
            for _ in range(5):  # and its data is intact in the recycled region
                assert intact(msg), msg.request_id
                msg = receiver.recv(timeout=30)
        finally:
            second.kill()
    assert "silent for" in caplog.text  # the dead sender's lease was reclaimed by timeout


def test_sender_reattaches_after_receiver_restart() -> None:
    address = free_tcp_address()
    seen = SPAWN.Queue()
    first = _start(_receive_forever, address, seen)
    with HostIpcSender(address) as sender:
        i = 0

        def send_until_seen() -> tuple[str, bool]:
            nonlocal i
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    sender.send(numbered("m", i), timeout=0.2)
                    i += 1
                except TransportTimeout:
                    pass
                if not seen.empty():
                    return seen.get()
            raise AssertionError("nothing got through")

        assert send_until_seen()[1]
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        # A fresh report queue: the killed receiver may have died inside Queue.put, holding its lock.
        seen = SPAWN.Queue()
        second = _start(_receive_forever, address, seen)
        try:
            request_id, ok = send_until_seen()
            assert ok, f"{request_id} arrived corrupted after the restart"
        finally:
            second.kill()


def test_full_receiver_makes_extra_senders_wait_with_a_clear_reason() -> None:
    msg = EncodeResult("x", "key", (1, 1, 1), torch.ones(4, 4))
    with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:
        first = HostIpcSender(receiver.address)
        deliver(receiver, first, msg)  # holds the only lease
        with HostIpcSender(receiver.address) as second:
            reasons = set()
            for _ in range(20):
                receiver.recv(timeout=0.05)
                with pytest.raises(TransportTimeout) as info:
                    second.send(msg, timeout=0.05)
                reasons.add(str(info.value))
            assert any("all 1 leases are held" in r for r in reasons), reasons
            first.close()  # DETACH frees the lease: the waiting sender gets it
            deliver(receiver, second, msg)


def test_an_idle_sender_keeps_its_lease_and_checks_it_before_writing() -> None:
    """Silent for longer than the lease timeout, a sender still holds its lease (nobody else
    needed it): its next send asks the receiver first (PING, PONG) and goes through on it."""
    with (
        HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1, lease_timeout=0.4) as receiver,
        HostIpcSender(receiver.address) as sender,
    ):
        deliver(receiver, sender, numbered("a", 0))
        lease = sender._lease
        quiet_until = time.monotonic() + 0.6
        while time.monotonic() < quiet_until:  # the receiver keeps serving, the sender says nothing
            assert receiver.recv(timeout=0.05) is None
        deliver(receiver, sender, numbered("a", 1))
        assert sender._lease is lease and receiver.stats.rejected == 0


class _CountingWriter(HostWriter):
    writes = 0

    def write(self, offset: int, src: torch.Tensor) -> None:
        _CountingWriter.writes += 1
        super().write(offset, src)


class _CountingSender(HostIpcSender):
    writer_type = _CountingWriter


def test_a_sender_whose_lease_was_reclaimed_never_writes_into_it() -> None:
    """Sender A goes quiet; B needs the only lease and gets it once A has been silent for the
    lease timeout. A's next send must learn it lost the lease before writing, and then wait
    for a lease like any extra sender."""
    with (
        HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1, lease_timeout=0.4) as receiver,
        _CountingSender(receiver.address) as a,
        HostIpcSender(receiver.address) as b,
    ):
        deliver(receiver, a, numbered("a", 0))
        assert _CountingWriter.writes == 1
        time.sleep(0.5)
        deliver(receiver, b, numbered("b", 0))  # takes A's lease
        b.send(numbered("b", 1), timeout=5)  # in the region, not read yet
        with pytest.raises(TransportTimeout, match="does not answer"):
            a.send(numbered("a", 1), timeout=0.3)  # A asks first; the receiver is not serving
        msg = receiver.recv(timeout=5)
        assert msg.request_id == "b-1" and intact(msg)
        assert receiver.recv(timeout=0.1) is None  # reads A's PING: EXPIRED
        with pytest.raises(TransportTimeout, match="no lease"):
            a.send(numbered("a", 2), timeout=0.05)  # A hears it and asks for a lease again
        assert a._lease is None
        assert _CountingWriter.writes == 1, "A wrote into a lease it no longer held"


# ------------------------------------------------------------------------- write fences


@contextlib.contextmanager
def _held_fences():
    """A receiver whose senders' write fences stay not done until the test sets HeldFences.done."""
    HeldFences.done = False
    try:
        with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=2, lease_timeout=0.5) as receiver:
            yield receiver
    finally:
        HeldFences.done = True


def test_a_message_waits_for_its_write_fence_and_keeps_its_senders_order() -> None:
    """A DATA whose data has not landed is not delivered; the same sender's later message
    (inline only) waits behind it; then both come, in order."""
    with _held_fences() as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {k: lease[k] for k in ("session", "lease", "gen")}
        header = bytes(encode_message(EncodeResult("result-1", "k", (1, 1, 1), torch.ones(4, 8)))[0])
        error = bytes(encode_message(EncodeError("error-2", "k", "bad_image", "x"))[0])
        peer.sock.send_multipart([b"data", ctrl(**key, seq=1, spans=[[0, 128]], fence=bytes(64)), header])
        peer.sock.send_multipart([b"data", ctrl(**key, seq=0, spans=[], fence=b""), error])
        assert receiver.recv(timeout=0.3) is None, "delivered before its data landed, or let a later one overtake"
        HeldFences.done = True
        assert [receiver.recv(timeout=1).request_id for _ in range(2)] == ["result-1", "error-2"]
        kind, free = peer.reply()
        assert kind == b"free" and free["seq"] == 1  # the span comes back once read


def test_a_dead_senders_message_whose_data_never_landed_is_dropped(caplog) -> None:
    """Its fence never completes (the sender died before its copy ran): the message must never
    be delivered, and is dropped once the silent sender's lease is reclaimed."""
    with _held_fences() as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {k: lease[k] for k in ("session", "lease", "gen")}
        header = bytes(encode_message(EncodeResult("never", "k", (1, 1, 1), torch.ones(4, 8)))[0])
        peer.sock.send_multipart([b"data", ctrl(**key, seq=1, spans=[[0, 128]], fence=bytes(64)), header])
        peer.sock.close(0)
        assert receiver.recv(timeout=1.5) is None
        assert receiver.leases_held == 0
        assert "reclaimed before its writes landed" in caplog.text


def test_a_detach_right_behind_a_landed_message_still_delivers_it() -> None:
    with _held_fences() as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {k: lease[k] for k in ("session", "lease", "gen")}
        header = bytes(encode_message(EncodeResult("last", "k", (1, 1, 1), torch.ones(4, 8)))[0])
        HeldFences.done = True
        peer.sock.send_multipart([b"data", ctrl(**key, seq=1, spans=[[0, 128]], fence=bytes(64)), header])
        peer.sock.send_multipart([b"detach", ctrl(**key)])
        time.sleep(0.2)  # both are in the receiver's socket before it looks
        msg = receiver.recv(timeout=1)
        assert msg is not None and msg.request_id == "last"


def test_a_failed_copy_out_still_frees_its_span() -> None:
    """Out of GPU memory (say) while copying a message out: the error reaches the caller, and
    the span still goes back, so the sender is not stalled for good."""
    with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=64 * KIB, max_senders=1) as receiver:
        real, calls = receiver._region.copy_out, [0]

        def fails_once(spans):
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("out of memory (simulated)")
            return real(spans)

        receiver._region.copy_out = fails_once
        got: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                try:
                    msg = receiver.recv(timeout=0.05)
                except RuntimeError as exc:
                    errors.append(str(exc))
                    continue
                if msg is not None:
                    got.append(msg.request_id)

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            with HostIpcSender(receiver.address) as sender:
                for i in range(20):  # 16 KiB each through a 64 KiB lease: every span is reused
                    sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), torch.ones(4, 1024)), timeout=5)
                deadline = time.monotonic() + 10
                while len(got) < 19 and time.monotonic() < deadline:
                    time.sleep(0.01)
        finally:
            stop.set()
            thread.join()
        assert errors == ["out of memory (simulated)"]
        assert got == [f"m-{i}" for i in range(1, 20)]


# ------------------------------------------------------------------ hostile control traffic


def test_hostile_control_messages_are_rejected_and_service_continues(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="transfer.cuda_ipc_receiver")
    with HostIpcReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=2) as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {"session": lease["session"], "lease": lease["lease"], "gen": lease["gen"]}
        header = bytes(encode_message(EncodeResult("r", "k", (1, 1, 1), torch.ones(4, 8)))[0])  # 128 bytes
        job = bytes(encode_message(EncodeJob("j", "k", b"png", "tcp://a:1"))[0])
        fence = bytes(64)

        def data(seq: int, spans: list, **changes) -> bytes:
            return ctrl(**{**key, "seq": seq, "spans": spans, "fence": fence, **changes})

        cases = {
            "garbage control": ([b"data", b"\xc1garbage", header], "not valid msgpack"),
            "unknown kind": ([b"launch", ctrl()], "unknown control message"),
            "wrong version": ([b"attach", msgpack.packb({"v": 99, "sender": "x"})], "unsupported protocol version"),
            "missing key": ([b"attach", ctrl()], "control message keys"),
            "span out of bounds": ([b"data", data(1, [[256 * KIB, 128]]), header], "does not fit"),
            "span misaligned": ([b"data", data(2, [[8, 128]]), header], "does not fit"),
            "span wrong size": ([b"data", data(3, [[0, 64]]), header], "does not fit"),
            "negative offset": ([b"data", data(4, [[-256, 128]]), header], "does not fit"),
            "span count": ([b"data", data(5, []), header], "0 spans for 1 frames"),
            "bad span": ([b"data", data(6, [[0, True]]), header], "bad span"),
            "stale generation": (
                [b"data", data(7, [[0, 128]], gen=key["gen"] + 1), header],
                "lease expired or not yours",
            ),
            "other session": ([b"data", data(8, [[0, 128]], session=key["session"] + 1), header], "receiver restarted"),
            "lease out of range": ([b"ping", ctrl(**{**key, "lease": 99})], "lease expired or not yours"),
            "missing inline frame": ([b"data", data(9, [None]), header], "0 inline frames"),
            "bad header": ([b"data", data(10, [[0, 128]]), b"\x00\x01"], "header"),
            "no header": ([b"data", data(11, [[0, 128]])], "DATA with 1 frames"),
            "seq not an int": ([b"data", data("x", [[0, 128]]), header], "'seq' has a bad value"),
            "fence not bytes": ([b"data", data(12, [[0, 128]], fence="x"), header], "'fence' has a bad value"),
            "no write fence": ([b"data", data(13, [[0, 128]], fence=b""), header], "fence of 0 bytes"),
            "short write fence": ([b"data", data(14, [[0, 128]], fence=b"\x01" * 8), header], "fence of 8 bytes"),
            "fence without region data": (
                [b"data", data(15, [None]), job, b"png"],
                "without region spans names a write fence",
            ),
            "bytes in the region": ([b"data", data(16, [[0, 3]]), job], "may not use"),
        }
        for frames, _ in cases.values():
            peer.send(*frames)
        assert receiver.stats.rejected == len(cases)
        for name, (_, reason) in cases.items():
            assert reason in caplog.text, f"no logged reason for {name}"
        # The spans of refused DATA on our lease still come back; the stale-lease replies too.
        replies = {}
        while peer.sock.poll(200):
            kind, body = peer.sock.recv_multipart()
            replies.setdefault(kind, []).append(msgpack.unpackb(body))
        assert {1, 2, 3, 4, 5, 6, 9, 10, 13, 14, 15, 16} <= {f["seq"] for f in replies[b"free"]}, replies
        assert len(replies[b"expired"]) == 3
        # A message for this lease from another identity is refused too.
        other = RawPeer(receiver)
        other.send(b"data", data(17, [[0, 128]]), header)
        assert other.reply()[0] == b"expired"
        # The receiver still serves a well-behaved sender.
        with HostIpcSender(receiver.address) as good:
            deliver(receiver, good, EncodeResult("ok", "k", (1, 1, 1), pattern(1, 16, 16, torch.bfloat16)))


def test_unknown_and_dropped_transport_names_list_the_valid_ones() -> None:
    from transfer.registry import make_sender

    for name in ("carrier_pigeon", "shm", "nixl"):
        with pytest.raises(ValueError, match=r"choose one of \['cuda_ipc', 'zmq'\]"):
            make_sender(name, "tcp://127.0.0.1:1")
    assert PROTOCOL_VERSION >= 4  # the control messages above are this version's
