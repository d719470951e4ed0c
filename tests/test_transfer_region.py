"""The receiver-owned region protocol (shared by cuda_ipc, shm and nixl), exercised through the
shm backend between real processes: exact delivery, span recycling, backpressure, dead and
restarted peers, hostile control messages."""

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
import zmq

from tests.net import free_tcp_address
from tests.region_hooks import count_data_messages, deliver
from transfer.base import TransportError, TransportTimeout
from transfer.codec import encode_message
from transfer.messages import PROTOCOL_VERSION, EncodeError, EncodeJob, EncodeResult
from transfer.region import Ring
from transfer.registry import make_receiver, make_sender
from transfer.shm import ShmReceiver, ShmSender

# Peers start from a clean forkserver (nothing inherited from pytest) that has torch imported
# already, so each one costs ~0.1 s instead of a fresh interpreter's ~1.5 s.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "zmq", "msgpack", "transfer.region", "transfer.zmq_transport"])
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
        return (type(b) is EncodeResult and a.request_id == b.request_id and a.embeddings.dtype == b.embeddings.dtype
                and torch.equal(a.embeddings.view(BITS[a.embeddings.dtype]), b.embeddings.view(BITS[b.embeddings.dtype])))
    return a == b


# ------------------------------------------------------------------------ peer processes


def _send_stream(address: str, n: int) -> None:
    with make_sender("shm", address) as sender:
        for msg in stream(n):
            sender.send(msg, timeout=30)
        time.sleep(0.5)


def _send_forever(address: str, tag: str) -> None:
    sender = ShmSender(address)
    i = 0
    while True:
        sender.send(EncodeResult(f"{tag}-{i}", "key", (1, 1, 1), pattern(i, 64, 512, torch.float32)), timeout=60)
        i += 1


def _receive_forever(address: str, seen) -> None:
    with ShmReceiver(address, lease_bytes=256 * KIB, max_senders=1) as receiver:
        while True:
            msg = receiver.recv()
            seen.put((msg.request_id, same(msg, EncodeResult(msg.request_id, "key", (1, 1, 1),
                                                             pattern(int(msg.request_id.split("-")[1]), 64, 512, torch.float32)))))


def _send_n(address: str, n: int) -> None:
    with ShmSender(address) as sender:
        for i in range(n):
            sender.send(EncodeResult(f"m-{i}", "key", (1, 1, 1), pattern(i, 64, 512, torch.float32)), timeout=10)
        time.sleep(0.5)


# Tensors that travel inline: empty ones, and one too large for the 256 KiB test lease.
INLINE_CASES = [(torch.bfloat16, 0, 16), (torch.float32, 0, 8192), (torch.float16, 300, 1024)]


def _send_inline_cases(address: str) -> None:
    with ShmSender(address) as sender:
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            sender.send(EncodeResult(f"m-{i}", "key", (1, 1, 1), pattern(i, rows, cols, dtype)), timeout=30)
        time.sleep(0.5)


class _FenceDoneOnlyWhenWaited:
    """A copy-out still running that nobody waits for never reports done (a GPU copy-out
    queued behind other work does so for a long while)."""

    def __init__(self) -> None:
        self.waited = False

    def done(self) -> bool:
        return self.waited

    def wait(self) -> None:
        self.waited = True


def _start(target, *args):
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flood(address: str, report) -> None:
    with ShmSender(address, max_pending=4) as sender:
        encode_message(EncodeResult("warm", "key", (1, 1, 1), torch.full((256, 1024), 1.0)))  # first-use costs
        start, sent = _rss(), 0
        for i in range(200):
            try:
                sender.send(EncodeResult(f"f-{i}", "key", (1, 1, 1), torch.full((256, 1024), float(i))), timeout=0.5)
            except TransportTimeout:
                break
            sent += 1
        report.put((sent, _rss() - start))


# ------------------------------------------------------------------------------- tests


def test_stream_is_bit_exact_and_spans_are_recycled() -> None:
    n = 60  # ~10 MiB through a 256 KiB lease: every span is reused many times
    with make_receiver("shm", "tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=2) as receiver:
        proc = _start(_send_stream, receiver.address, n)
        got = [receiver.recv(timeout=30) for _ in range(n + 2)]
        proc.join(10)
        assert receiver.stats.rejected == 0
    for want, have in zip(stream(n), got):
        assert have is not None and same(want, have), f"{want.request_id} changed on the way"


def _send_stream_in_batches(address: str, n: int, batch: int) -> None:
    with make_sender("shm", address) as sender:
        msgs = stream(n)
        for at in range(0, len(msgs), batch):
            sender.send_many(msgs[at : at + batch], timeout=30)
        time.sleep(0.5)


@pytest.mark.parametrize("lease_kib", [256, 4096])
def test_send_many_is_bit_exact_in_order_and_shares_control_messages(lease_kib: int) -> None:
    """Batches mixing dtypes, empty tensors, messages larger than the lease and messages without
    tensors arrive bit-exact and in order; a batch too big for the lease goes in parts (256 KiB);
    and where batches fit (4 MiB), each goes as one DATA message."""
    n = 60
    with make_receiver("shm", "tcp://127.0.0.1:*", lease_bytes=lease_kib * KIB, max_senders=1) as receiver:
        datas = count_data_messages(receiver)
        proc = _start(_send_stream_in_batches, receiver.address, n, 6)
        got = [receiver.recv(timeout=30) for _ in range(n + 2)]
        proc.join(10)
        assert receiver.stats.rejected == 0
    for want, have in zip(stream(n), got, strict=True):
        assert have is not None and same(want, have), f"{want.request_id} changed on the way"
    if lease_kib == 4096:  # every batch of 6 fits: one DATA each (the first may go before the lease came)
        assert datas[0] <= -(-(n + 2) // 6) + 1, f"{datas[0]} DATA messages for {n + 2} messages in batches of 6"


def test_empty_and_oversized_tensors_arrive_on_the_receivers_device() -> None:
    """Inline tensors (empty, or too large for a lease) come out where region payloads do: on
    the region's device. A stand-in device shows it on CPU; test_transfer_cuda_ipc checks cuda."""
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:
        receiver._memory.device = torch.device("meta")
        proc = _start(_send_inline_cases, receiver.address)
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            got = receiver.recv(timeout=30)
            assert got is not None and got.request_id == f"m-{i}"
            emb = got.embeddings
            assert (emb.device.type, emb.dtype, tuple(emb.shape)) == ("meta", dtype, (rows, cols))
        proc.join(10)
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:  # and intact on CPU
        proc = _start(_send_inline_cases, receiver.address)
        for i, (dtype, rows, cols) in enumerate(INLINE_CASES):
            want = EncodeResult(f"m-{i}", "key", (1, 1, 1), pattern(i, rows, cols, dtype))
            got = receiver.recv(timeout=30)
            assert got is not None and same(want, got) and got.embeddings.device.type == "cpu"
        proc.join(10)


def test_idle_receiver_waits_for_copy_outs_and_frees_their_spans() -> None:
    """Two messages fill the lease; each later one needs a FREE, which the receiver can only
    send once it waited for the copy-out. It must do so whenever it has nothing to read."""
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:
        receiver._memory.fence = _FenceDoneOnlyWhenWaited
        proc = _start(_send_n, receiver.address, 12)
        got = [receiver.recv(timeout=10) for _ in range(12)]
        assert [m.request_id if m else None for m in got] == [f"m-{i}" for i in range(12)]
        assert receiver.recv(timeout=0) is None
        assert not receiver._pending_free, "copy-outs still pending after an idle recv()"
        assert not any(h.done for h in receiver._leases if h), "FREEs held back after an idle recv()"
        proc.join(10)


def test_stalled_receiver_pushes_back_and_sender_memory_stays_bounded() -> None:
    report = SPAWN.Queue()
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=1024 * KIB, max_senders=1) as receiver:
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


def test_dead_sender_lease_is_reclaimed_and_region_stays_intact(caplog) -> None:
    caplog.set_level(logging.INFO, logger="transfer.region_receiver")
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1, lease_timeout=1.0) as receiver:
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
                i = int(msg.request_id.split("-")[1])
                assert same(msg, EncodeResult(msg.request_id, "key", (1, 1, 1), pattern(i, 64, 512, torch.float32)))
                msg = receiver.recv(timeout=30)
        finally:
            second.kill()
    assert "silent for" in caplog.text  # the dead sender's lease was reclaimed by timeout


def test_sender_reattaches_after_receiver_restart() -> None:
    address = free_tcp_address()
    seen = SPAWN.Queue()
    first = _start(_receive_forever, address, seen)
    with ShmSender(address) as sender:
        i = 0

        def send_until_seen() -> tuple[str, bool]:
            nonlocal i
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    sender.send(EncodeResult(f"m-{i}", "key", (1, 1, 1), pattern(i, 64, 512, torch.float32)), timeout=0.2)
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
            request_id, intact = send_until_seen()
            assert intact, f"{request_id} arrived corrupted after the restart"
        finally:
            second.kill()


def test_full_receiver_makes_extra_senders_wait_with_a_clear_reason() -> None:
    msg = EncodeResult("x", "key", (1, 1, 1), torch.ones(4, 4))

    def deliver(sender: ShmSender) -> None:
        for _ in range(100):
            if receiver.recv(timeout=0.05) is not None:
                return
            try:
                sender.send(msg, timeout=0.05)
            except TransportTimeout:
                pass
        raise AssertionError("the sender never got through")

    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:
        first = ShmSender(receiver.address)
        deliver(first)  # holds the only lease
        with ShmSender(receiver.address) as second:
            reasons = set()
            for _ in range(20):
                receiver.recv(timeout=0.05)
                with pytest.raises(TransportTimeout) as info:
                    second.send(msg, timeout=0.05)
                reasons.add(str(info.value))
            assert any("leases are held" in r for r in reasons), reasons
            first.close()  # DETACH frees the lease: the waiting sender gets it
            deliver(second)


def test_backend_mismatch_is_refused_for_good() -> None:
    from transfer.region_sender import RegionSender

    class OtherSender(RegionSender):
        backend = "cuda_ipc"

    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:
        with OtherSender(receiver.address, lambda *a: None) as sender:
            for _ in range(100):
                receiver.recv(timeout=0.02)
                try:
                    sender.send(EncodeResult("x", "key", (1, 1, 1), torch.ones(4, 4)), timeout=0.02)
                except TransportTimeout:
                    continue
                except TransportError as exc:
                    assert "speaks 'shm', not 'cuda_ipc'" in str(exc)
                    return
            raise AssertionError("never refused")


# ------------------------------------------------------------------ hostile control traffic


class RawPeer:
    """Speaks the region protocol by hand, to send what a correct sender never would."""

    def __init__(self, receiver: ShmReceiver):
        self.receiver = receiver
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(receiver.address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))
        assert self.receiver.recv(timeout=0.1) is None

    def reply(self) -> tuple[bytes, dict]:
        assert self.sock.poll(2000)
        kind, body = self.sock.recv_multipart()
        return kind, msgpack.unpackb(body)

    def attach(self) -> dict:
        self.send(b"attach", ctrl(sender="raw", backend="shm"))
        kind, lease = self.reply()
        assert kind == b"lease"
        return lease


def ctrl(**fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields})


def test_hostile_control_messages_are_rejected_and_service_continues(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="transfer.region_receiver")
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=2) as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {"session": lease["session"], "lease": lease["lease"], "gen": lease["gen"]}
        frames = encode_message(EncodeResult("r", "k", (1, 1, 1), torch.ones(4, 8)))
        header = bytes(frames[0])
        cases = {
            "garbage control": ([b"data", b"\xc1garbage", header], "not valid msgpack"),
            "unknown kind": ([b"launch", ctrl()], "unknown control message"),
            "wrong version": ([b"attach", msgpack.packb({"v": 99, "sender": "x", "backend": "shm"})], "unsupported protocol version"),
            "span out of bounds": ([b"data", ctrl(**key, seq=1, spans=[[256 * KIB, 128]], low=False, fence=b"", count=1), header], "does not fit"),
            "span misaligned": ([b"data", ctrl(**key, seq=2, spans=[[8, 128]], low=False, fence=b"", count=1), header], "does not fit"),
            "span wrong size": ([b"data", ctrl(**key, seq=3, spans=[[0, 64]], low=False, fence=b"", count=1), header], "does not fit"),
            "negative offset": ([b"data", ctrl(**key, seq=4, spans=[[-256, 128]], low=False, fence=b"", count=1), header], "does not fit"),
            "span count": ([b"data", ctrl(**key, seq=5, spans=[], low=False, fence=b"", count=1), header], "0 spans for 1 frames"),
            "stale generation": ([b"data", ctrl(**{**key, "gen": key["gen"] + 1}, seq=6, spans=[[0, 128]], low=False, fence=b"", count=1), header], "lease expired or not yours"),
            "other session": ([b"data", ctrl(**{**key, "session": key["session"] + 1}, seq=7, spans=[[0, 128]], low=False, fence=b"", count=1), header], "receiver restarted"),
            "lease out of range": ([b"ping", ctrl(**{**key, "lease": 99})], "lease expired or not yours"),
            "missing inline frame": ([b"data", ctrl(session=0, lease=(1 << 63) - 1, gen=0, seq=0, spans=[None], low=False, fence=b"", count=1), header], "0 inline frames"),
            "low not a bool": ([b"data", ctrl(**key, seq=10, spans=[[0, 128]], low=1, fence=b"", count=1), header], "'low' has a bad value"),
            "bad header": ([b"data", ctrl(**key, seq=8, spans=[[0, 128]], low=False, fence=b"", count=1), b"\x00\x01"], "header"),
            "no message": ([b"data", ctrl(**key, seq=13, spans=[], low=False, fence=b"", count=0), header], "carries 0 messages"),
            "more messages than headers": ([b"data", ctrl(**key, seq=14, spans=[[0, 128]], low=False, fence=b"", count=2), header],
                                           "carries 2 messages"),
            "second header bad": ([b"data", ctrl(**key, seq=16, spans=[[0, 128], [256, 128]], low=False, fence=b"", count=2),
                                   header, b"\x00\x01"], "header"),
            "count not an int": ([b"data", ctrl(**key, seq=15, spans=[[0, 128]], low=False, fence=b"", count="1"), header],
                                 "'count' has a bad value"),
            "fence not bytes": ([b"data", ctrl(**key, seq=11, spans=[[0, 128]], low=False, fence="x", count=1), header], "'fence' has a bad value"),
            "device fence on host memory": ([b"data", ctrl(**key, seq=12, spans=[[0, 128]], low=False, fence=bytes(64), count=1), header],
                                            "names a device write fence, but this region is in host memory"),
            "fence without a lease": ([b"data", ctrl(session=0, lease=(1 << 63) - 1, gen=0, seq=0, spans=[None], low=False, fence=bytes(64), count=1),
                                       header, bytes(128)], "without a lease names a write fence"),
        }
        for msg, _ in cases.values():
            peer.send(*msg)
        assert receiver.stats.rejected == len(cases)
        for name, (_, reason) in cases.items():
            assert reason in caplog.text, f"no logged reason for {name}"
        # The spans of refused DATA on our lease still come back (a PING makes the idle receiver
        # FREE at once); replies to the stale-lease cases come first.
        peer.send(b"ping", ctrl(**key))
        for _ in range(10):
            kind, body = peer.reply()
            if kind == b"free":
                break
        assert kind == b"free" and {1, 2, 3, 4, 5, 8, 12} <= set(body["seqs"]), (kind, body)
        # A message from another process's lease must not be accepted on this identity either.
        other = RawPeer(receiver)
        other.send(b"data", ctrl(**key, seq=9, spans=[[0, 128]], low=False, fence=b"", count=1), header)
        assert other.reply()[0] == b"expired"
        # The receiver still serves a well-behaved sender.
        with ShmSender(receiver.address) as good:
            want = EncodeResult("ok", "k", (1, 1, 1), pattern(1, 16, 16, torch.bfloat16))
            for _ in range(100):
                msg = receiver.recv(timeout=0.05)
                if msg is not None:
                    break
                try:
                    good.send(want, timeout=0.01)
                except TransportTimeout:
                    pass
            assert same(want, msg)


def test_unknown_transport_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        make_sender("carrier_pigeon", "tcp://127.0.0.1:1")


# ------------------------------------------------------------------ per-message fast paths


def test_ring_allocates_in_order_and_frees_out_of_order() -> None:
    ring = Ring(1024)
    assert [ring.alloc(seq, 256) for seq in (1, 2, 3)] == [0, 256, 512]
    assert ring.fit(512) is None and ring.fit(256) == 768
    ring.free(2)  # not the oldest: nothing comes back yet
    assert ring.fit(512) is None
    ring.free(1)
    assert ring.fit(512) == 0 and ring.alloc(4, 512) == 0  # wraps to the start
    assert ring.alloc(5, 256) is None
    ring.free(99)  # a seq it never gave out changes nothing
    for seq in (3, 4):
        ring.free(seq)
    assert not ring.live and ring.fit(1024) == 0


def test_fence_polling_spins_while_messages_land_and_backs_off_when_none_do() -> None:
    """A sender a lease ahead of its copies sends each DATA up to a lease's link time (~1 ms)
    before its data lands: the receiver must keep looking while deliveries go on, however long
    ago the messages arrived, and only back off (at most 1 ms, ~10% of the wait) when nothing
    arrives or lands."""
    from transfer.region_receiver import MAX_FENCE_POLL_S, WRITE_SPIN_S, fence_poll_sleep

    now = 100.0
    assert fence_poll_sleep(now, now - 0.0001, 0.0) == 0  # just arrived
    assert fence_poll_sleep(now, now - 5 * WRITE_SPIN_S, now - 0.0001) == 0  # arrived long ago, deliveries go on
    assert fence_poll_sleep(now, now - 5 * WRITE_SPIN_S, now - 2 * WRITE_SPIN_S) == pytest.approx(0.2 * WRITE_SPIN_S)
    assert fence_poll_sleep(now, now - 60.0, now - 30.0) == MAX_FENCE_POLL_S  # a dead sender's message


def test_recv_restarts_the_fence_polling_clock_at_each_delivery() -> None:
    """The clock fence_poll_sleep reads: recv() sets it whenever it hands a DATA's messages out."""
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver, \
            ShmSender(receiver.address) as sender:
        for i in range(2):
            before = time.monotonic()
            deliver(receiver, sender, EncodeResult(f"m-{i}", "key", (1, 1, 1), torch.ones(4, 8)))
            assert before <= receiver._last_delivery <= time.monotonic()


def _receive_ids(address: str, seen) -> None:
    with ShmReceiver(address, lease_bytes=256 * KIB, max_senders=1) as receiver:
        while True:
            seen.put(receiver.recv().request_id)


def test_caller_sends_data_itself_when_the_io_thread_sleeps() -> None:
    """With the writes landed (shm: always) and the I/O thread asleep, send() hands the DATA to
    zmq from the caller's thread: no thread wake-up on the message's path."""
    seen = SPAWN.Queue()
    address = free_tcp_address()
    proc = _start(_receive_ids, address, seen)
    try:
        with ShmSender(address) as sender:
            threads = []
            send_data = sender._send_data

            def recording(sock, job):
                threads.append(threading.current_thread())
                return send_data(sock, job)

            sender._send_data = recording
            for i in range(3):
                sender.send(EncodeResult(f"m-{i}", "key", (1, 1, 1), torch.ones(4, 8)), timeout=30)
                assert seen.get(timeout=30) == f"m-{i}"
                time.sleep(0.2)  # the I/O thread goes back to sleep
            assert threads[1:] == [threading.current_thread()] * 2
    finally:
        proc.kill()


def test_sender_short_of_space_is_freed_at_once_by_an_idle_receiver() -> None:
    """A small message leaves room for another of its size, so its span is not FREEd at once;
    a larger one then does not fit. Its sender PINGs, and the idle receiver FREEs at once
    instead of holding the sender up until the next heartbeat (1 s)."""
    seen = SPAWN.Queue()
    address = free_tcp_address()
    proc = _start(_receive_ids, address, seen)
    try:
        with ShmSender(address) as sender:
            sender.send(EncodeResult("small-0", "key", (1, 1, 1), torch.ones(64, 256)), timeout=30)  # 64 of 256 KiB
            assert seen.get(timeout=30) == "small-0"
            time.sleep(0.2)
            start = time.monotonic()
            sender.send(EncodeResult("big-1", "key", (1, 1, 1), torch.ones(200, 256)), timeout=30)  # 200 KiB
            assert time.monotonic() - start < 0.5
            assert seen.get(timeout=30) == "big-1"
    finally:
        proc.kill()


def test_idle_receiver_batches_frees_unless_the_sender_is_short_of_space() -> None:
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=1) as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {"session": lease["session"], "lease": lease["lease"], "gen": lease["gen"]}
        header = bytes(encode_message(EncodeResult("r", "k", (1, 1, 1), torch.ones(4, 8)))[0])  # 128 bytes

        def deliver(seq: int, low: bool) -> None:
            peer.sock.send_multipart([b"data", ctrl(**key, seq=seq, spans=[[256 * seq, 128]], low=low, fence=b"", count=1), header])
            assert receiver.recv(timeout=2) is not None
            assert receiver.recv(timeout=0.05) is None  # idle

        deliver(1, low=False)
        assert not peer.sock.poll(200), "FREE for a sender with room to spare"
        deliver(2, low=True)
        kind, free = peer.reply()
        assert kind == b"free" and free["seqs"] == [1, 2]
        deliver(3, low=False)
        assert not peer.sock.poll(200)
        peer.send(b"ping", ctrl(**key))  # e.g. a sender waiting for space
        kind, free = peer.reply()
        assert kind == b"free" and free["seqs"] == [3]


# ------------------------------------------------------------ write fences (stand-in events)


class _StandInFence:
    """Plays a sender's opened write fence on a host region: done when the test says so."""

    done = False

    def query(self) -> bool:
        return _StandInFence.done


def _fenced_receiver() -> ShmReceiver:
    receiver = ShmReceiver("tcp://127.0.0.1:*", lease_bytes=256 * KIB, max_senders=2)
    receiver._memory.open_fence = lambda wire: _StandInFence()
    _StandInFence.done = False
    return receiver


def test_a_message_waits_for_its_write_fence_and_keeps_its_senders_order() -> None:
    """A DATA whose writes have not landed is not delivered; the same sender's later message
    (inline only, needing no region) waits behind it; then both come, in order."""
    with _fenced_receiver() as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {k: lease[k] for k in ("session", "lease", "gen")}
        header = bytes(encode_message(EncodeResult("result-1", "k", (1, 1, 1), torch.ones(4, 8)))[0])
        error = bytes(encode_message(EncodeError("error-2", "k", "bad_image", "x"))[0])
        peer.sock.send_multipart([b"data", ctrl(**key, seq=1, spans=[[0, 128]], low=False, fence=bytes(64), count=1), header])
        peer.sock.send_multipart([b"data", ctrl(session=0, lease=(1 << 63) - 1, gen=0, seq=0, spans=[], low=False, fence=b"",
                                                count=1), error])
        assert receiver.recv(timeout=0.3) is None, "delivered before its writes landed, or let a later one overtake"
        _StandInFence.done = True
        assert [receiver.recv(timeout=1).request_id for _ in range(2)] == ["result-1", "error-2"]


def test_a_detach_right_behind_a_landed_message_still_delivers_it() -> None:
    with _fenced_receiver() as receiver:
        peer = RawPeer(receiver)
        lease = peer.attach()
        key = {k: lease[k] for k in ("session", "lease", "gen")}
        header = bytes(encode_message(EncodeResult("last", "k", (1, 1, 1), torch.ones(4, 8)))[0])
        _StandInFence.done = True
        peer.sock.send_multipart([b"data", ctrl(**key, seq=1, spans=[[0, 128]], low=False, fence=bytes(64), count=1), header])
        peer.sock.send_multipart([b"detach", ctrl(**key)])
        time.sleep(0.2)  # both are in the receiver's socket before it looks
        msg = receiver.recv(timeout=1)
        assert msg is not None and msg.request_id == "last"


@contextlib.contextmanager
def _consumer(receiver, pause: float = 0.0):
    """A thread taking messages from `receiver` while the block runs, `pause` seconds after
    each; yields the request ids taken and the errors recv() raised."""
    got: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                msg = receiver.recv(timeout=0.05)
            except RuntimeError as exc:
                errors.append(str(exc))
                continue
            if msg is not None:
                got.append(msg.request_id)
                time.sleep(pause)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield got, errors
    finally:
        stop.set()
        thread.join()


def _wait_until(ready, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_failed_copy_out_still_frees_its_span() -> None:
    """Out of GPU memory (say) while copying a message out: the error reaches the caller, and
    the span still goes back, so the sender is not stalled for good."""
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=64 * KIB, max_senders=1) as receiver:
        real, calls = receiver._memory.copy_out, [0]

        def fails_once(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("out of memory (simulated)")
            return real(*args, **kwargs)

        receiver._memory.copy_out = fails_once
        with _consumer(receiver) as (got, errors), ShmSender(receiver.address) as sender:
            for i in range(20):  # 16 KiB each through a 64 KiB lease: every span is reused
                sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), torch.ones(4, 1024)), timeout=5)
            _wait_until(lambda: len(got) >= 19)
        assert errors == ["out of memory (simulated)"]
        assert got == [f"m-{i}" for i in range(1, 20)]


def test_send_many_timeout_applies_to_each_batch_not_the_whole_call() -> None:
    """A slow receiver (one message every 0.2 s) and a lease of 2 messages: eight messages
    with a 1 s timeout each go through send() one by one, so they must through send_many."""
    msgs = [EncodeResult(f"m-{i}", "k", (1, 1, 1), torch.ones(16, 1024)) for i in range(8)]  # 64 KiB each
    with ShmReceiver("tcp://127.0.0.1:*", lease_bytes=128 * KIB, max_senders=1) as receiver:
        with _consumer(receiver, pause=0.2) as (got, _), ShmSender(receiver.address) as sender:
            sender.send_many(msgs, timeout=1.0)  # ~1.6 s in all: raised TransportTimeout with one deadline
            _wait_until(lambda: len(got) >= 8)
        assert got == [m.request_id for m in msgs]
