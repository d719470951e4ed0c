"""The sending half of the region protocol (see transfer/region.py): lease, ring of spans,
writes through the backend, DATA naming their write fence (or after they landed), several
messages per DATA (send_many), heartbeats, re-attach on expiry."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zmq

from transfer.base import Sender, TransportError, TransportTimeout
from transfer.codec import DEFAULT_LIMITS, Limits, ProtocolError, host_buffer, pack_header, split_message
from transfer.messages import Message
from transfer.region import (
    ATTACH_RETRY_S,
    EXPIRED,
    FREE,
    HEARTBEAT_S,
    LEASE,
    MAX_BATCH,
    NO_LEASE,
    REFUSE,
    Fence,
    RegionWriter,
    Ring,
    align,
    pack_ctrl,
    unpack_ctrl,
)
from transfer.zmq_transport import check_address, common_options, deadline_after

log = logging.getLogger(__name__)


@dataclass
class _Lease:
    session: int
    index: int
    gen: int
    offset: int  # of the lease in the region
    nbytes: int
    writer: RegionWriter
    ring: Ring
    writing: int = 0  # send() calls writing into it right now (outside the lock)
    retired: bool = False  # no longer ours: close the writer once `writing` drops to 0


@dataclass
class _Job:
    frames: list  # [kind, ctrl, header, inline frames...]
    fence: Fence | None
    lease: _Lease | None  # None: inline only, needs no lease
    seq: int = 0
    keep: tuple = ()  # the source tensors, alive until their copies are known to be done


class RegionSender(Sender):
    """Sends messages through a receiver's region; see the module docstring for the protocol.

    `open_writer(export, offset, nbytes)` builds the backend's writer from the receiver's export
    and the lease's place in the region.
    Not thread-safe (like a zmq socket): one thread calls send().
    """

    backend: str = ""

    def __init__(self, address: str, open_writer: Callable[[dict[str, Any], int, int], RegionWriter], *,
                 max_pending: int = 8, limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None):
        check_address(address)
        self.address = address
        self._open_writer = open_writer
        self._limits = limits
        self._max_pending = max_pending
        self._id = uuid.uuid4().hex
        self._ctx = context or zmq.Context.instance()
        self._cond = threading.Condition()
        self._lease: _Lease | None = None
        self._refused: tuple[str, bool] | None = None  # (reason, worth retrying)
        self._outbox: collections.deque[_Job] = collections.deque()
        self._seq = 0
        self._writing: collections.deque[tuple[Fence, tuple]] = collections.deque()  # device-fenced writes, oldest first
        self._stop = False
        self._warned_inline = False
        self._io_sleeping = False  # the I/O thread is (about to be) blocked in poll: wake it for new jobs
        self._want_space = False  # send() waits for span space: the I/O thread PINGs the receiver
        self._waiting_space = False  # send() waits for span space: the I/O thread watches for FREEs
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # send() wakes the I/O thread
        self._sock_lock = threading.Lock()  # held by whichever thread uses the socket (see _pump)
        self._sock: zmq.Socket | None = self._ctx.socket(zmq.DEALER)
        common_options(self._sock)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.SNDHWM, 2 * max_pending + 8)
        self._sock.connect(address)
        self._sock_fd = self._sock.getsockopt(zmq.FD)
        self._next_attach = 0.0  # owned by the socket lock's holder, like _last_sent
        self._last_sent = time.monotonic()
        self._thread = threading.Thread(target=self._io_loop, name=f"{self.backend}-sender", daemon=True)
        self._thread.start()

    # -- caller's thread

    def send(self, msg: Message, timeout: float | None = None) -> None:
        self.send_many([msg], timeout)

    def send_many(self, msgs: list[Message], timeout: float | None = None) -> None:
        """Up to MAX_BATCH messages per DATA, as many as fit half the lease together: one span,
        one write fence, one control message and one FREE for all of them. Half, so that one
        batch is written while the one before is copied out and freed (the receiver FREEs by
        half leases too); a message bigger than that goes alone. `timeout` applies to each
        DATA's wait, as it does to each send()'s."""
        while self._writing and self._writing[0][0].done():  # copies landed: their sources may go
            self._writing.popleft()
        split = [split_message(msg, self._limits) for msg in msgs]
        with self._cond:
            limit = self._lease.nbytes // 2 if self._lease is not None else None
        batch: list = []
        used = 0
        for item in split:
            size = sum(align(spec.nbytes) for spec, p in item[1] if isinstance(p, torch.Tensor))
            if batch and (len(batch) == MAX_BATCH or (limit is not None and (used + size > limit or size > limit))):
                self._send_batch(batch, timeout)  # full; a message too big for it goes alone
                batch, used = [], 0
            batch.append(item)
            used += size
        if batch:
            self._send_batch(batch, timeout)

    def _send_batch(self, batch: list[tuple[dict[str, Any], list]], timeout: float | None) -> None:
        deadline = deadline_after(timeout)
        payloads = [p for _, message_payloads in batch for p in message_payloads]  # every frame, in order
        direct = [i for i, (spec, p) in enumerate(payloads) if isinstance(p, torch.Tensor) and spec.nbytes > 0]
        total = sum(align(payloads[i][0].nbytes) for i in direct)
        spans: list[list[int] | None] = [None] * len(payloads)
        lease, fence, seq, start, low = None, None, 0, 0, False
        with self._cond:
            self._wait(lambda: len(self._outbox) < self._max_pending, deadline, "the receiver is not consuming")
            while direct:  # until the message has a span in a lease that is still ours
                lease = self._wait(lambda: self._lease, deadline, "no lease from the receiver", lease=True)
                if total > lease.nbytes:
                    if len(batch) > 1:
                        break  # sent in halves, below
                    if not self._warned_inline:
                        log.warning("%s: a %d-byte message exceeds the %d-byte lease; sending it inline "
                                    "through host memory (raise lease_bytes on the receiver)",
                                    self.address, total, lease.nbytes)
                        self._warned_inline = True
                    lease = None
                    break
                self._seq += 1
                seq = self._seq
                try:
                    start = self._wait(lambda lease=lease, seq=seq: self._alloc(lease, seq, total),
                                       deadline, "the receiver's region is full (it is not freeing spans)")
                except TransportError:
                    self._waiting_space = False  # nobody waits any more: the I/O thread may stop watching
                    raise
                if start is not None and start >= 0:
                    lease.writing += 1
                    low = lease.ring.fit(total) is None  # the receiver FREEs at once rather than batching
                    break
                lease = None  # the lease expired while we waited: use the next one
        if lease is not None and total > lease.nbytes:  # too big together for the lease
            half = len(batch) // 2
            self._send_batch(batch[:half], timeout)
            self._send_batch(batch[half:], timeout)
            return
        if lease is not None:
            # The copies are issued outside the lock: a synchronous one (shm) may take a while,
            # and the I/O thread must keep sending earlier messages and taking FREEs meanwhile.
            # `writing` keeps the writer open even if the lease expires under us.
            try:
                at = start
                for i in direct:
                    spec, tensor = payloads[i]
                    lease.writer.write(lease.offset + at, tensor.reshape(-1).view(torch.uint8))
                    spans[i] = [at, spec.nbytes]
                    at += align(spec.nbytes)
                fence = lease.writer.fence()
            except BaseException:
                with self._cond:
                    lease.ring.free(seq)  # nothing will be sent for this span
                    self._release_writer(lease)
                raise
        wire = fence.wire if fence is not None else b""
        ctrl = pack_ctrl(session=lease.session if lease else 0, lease=lease.index if lease else NO_LEASE,
                         gen=lease.gen if lease else 0, seq=seq, spans=spans, low=low, fence=wire, count=len(batch))
        inline = [host_buffer(p) for (_, p), span in zip(payloads, spans, strict=True) if span is None]
        keep = tuple(payloads[i][1] for i in direct) if lease is not None else ()
        if wire:  # the receiver checks the write fence itself: send now, keep the sources alive until it completes
            self._writing.append((fence, keep))
            fence, keep = None, ()
        headers = [pack_header(header) for header, _ in batch]
        job = _Job([b"data", ctrl, *headers, *inline], fence, lease, seq, keep)
        with self._cond:
            if lease is not None:
                self._release_writer(lease)
            self._outbox.append(job)
            io_busy = not self._io_sleeping  # it drains the outbox before it sleeps again
        # Fast path, when the I/O thread sleeps: if the writes have landed (always for shm), send
        # the DATA from this thread instead of waking it (a thread wake-up and GIL hand-off).
        if not io_busy and self._sock_lock.acquire(blocking=False):
            try:
                if self._sock is not None:
                    self._pump(self._sock, wait=False)
            finally:
                self._sock_lock.release()
        with self._cond:
            if self._outbox and self._io_sleeping:  # e.g. a GPU copy still running: the I/O thread waits for it
                self._io_sleeping = False
                self._wake()

    def _alloc(self, lease: _Lease, seq: int, n: int) -> int | None:
        """Under the lock: a span of n bytes in `lease` (-1: the lease is gone, None: no room yet).
        With no room, ask the I/O thread to PING: the receiver then FREEs what it has copied out
        at once, instead of batching."""
        if lease is not self._lease:
            return -1
        start = lease.ring.alloc(seq, n)
        self._waiting_space = start is None
        if start is None and not self._want_space:
            self._want_space = True
            self._io_sleeping = False
            self._wake()
        return start

    def _release_writer(self, lease: _Lease) -> None:
        """Under the lock: one write into `lease` ended; close its writer if it was retired."""
        lease.writing -= 1
        if lease.retired and lease.writing == 0:
            lease.writer.close()

    def _retire(self, lease: _Lease) -> None:
        """Under the lock: `lease` is no longer ours; close its writer now or after the last write."""
        if not lease.retired:
            lease.retired = True
            if lease.writing == 0:
                lease.writer.close()

    def _wait(self, ready: Callable[[], Any], deadline: float | None, why: str, lease: bool = False) -> Any:
        """Wait on the condition until `ready()` is not None/False; raise at the deadline, or at
        once if the receiver refused this sender for good (or its I/O thread failed)."""
        while True:
            if self._refused and not self._refused[1]:
                raise TransportError(f"{self.address} refused this sender: {self._refused[0]}")
            value = ready()
            if value is not None and value is not False:
                return value
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                detail = f" ({self._refused[0]})" if lease and self._refused else ""
                raise TransportTimeout(f"{self.address}: {why}{detail}")
            self._cond.wait(left if left is not None else 1.0)

    def _wake(self) -> None:
        os.eventfd_write(self._wake_fd, 1)  # a counter: repeated wakes before the I/O thread reads it merge

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._wake()
        self._thread.join(5)
        os.close(self._wake_fd)

    # -- the DEALER socket, shared by the caller's thread (fast path) and the I/O thread
    #
    # zmq sockets are not thread-safe, but may be used by one thread at a time with a full memory
    # barrier in between: whoever holds _sock_lock uses it. The I/O thread never blocks inside a
    # zmq call on it; it waits on the socket's ZMQ_FD, a plain file descriptor that zmq makes
    # readable when the socket's state changes. ZMQ_FD is edge-triggered: any zmq call may consume
    # the signal while messages stay readable. So every holder ends its turn by reading control
    # messages until zmq says EAGAIN (_pump does): a message that arrives after that signals the
    # descriptor again, and the I/O thread wakes for it.

    def _pump(self, sock: zmq.Socket, wait: bool) -> tuple[bool, Fence | None]:
        """Under _sock_lock: send what is due (ATTACH, queued DATA whose writes have landed, a
        PING when idle), then read every control message waiting. `wait` (the I/O thread): read
        control first too, and send an ATTACH or PING when due. Returns (zmq pushed back, the
        fence the oldest queued DATA waits for)."""
        if wait:
            self._read_control(sock)
            now = time.monotonic()
            with self._cond:
                lease, final = self._lease, self._refused is not None and not self._refused[1]
            if lease is None and now >= self._next_attach:
                # Keep asking after a refusal too (slowly if it was final): leases come free,
                # receivers get reconfigured.
                self._next_attach = now + (8 if final else 1) * ATTACH_RETRY_S
                self._try_send(sock, [b"attach", pack_ctrl(sender=self._id, backend=self.backend)])
        sent, blocked, fence = self._drain_outbox(sock)
        if sent:
            self._last_sent = time.monotonic()
        if wait:
            now = time.monotonic()
            with self._cond:
                lease, want, self._want_space = self._lease, self._want_space, False
            if lease is not None and (want or now - self._last_sent >= HEARTBEAT_S):
                if self._try_send(sock, [b"ping", pack_ctrl(session=lease.session, lease=lease.index, gen=lease.gen)]):
                    self._last_sent = now
        self._read_control(sock)
        return blocked, fence

    def _read_control(self, sock: zmq.Socket) -> None:
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # as a failed recv, it leaves ZMQ_FD armed
            self._on_control(sock.recv_multipart(zmq.NOBLOCK))

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock_fd, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        wake_only = zmq.Poller()
        wake_only.register(self._wake_fd, zmq.POLLIN)
        try:
            while True:
                with self._sock_lock:
                    if self._stop:
                        break
                    blocked, fence = self._pump(self._sock, wait=True)
                if fence is not None:  # the oldest DATA waits for its writes: wait outside the socket lock
                    try:
                        fence.wait()  # releases the GIL while the copy finishes
                    except TransportError:
                        pass  # _drain_outbox sees the failure through done() and drops the message
                    continue
                with self._cond:
                    # Sleep only with nothing to drain (or zmq pushing back); send() wakes a
                    # sleeping thread, and only then, so a busy stream costs no wake-ups.
                    self._io_sleeping = blocked or not self._outbox
                    timeout = (5 if blocked else 100) if self._io_sleeping else 0
                    # Watch the socket only while something is awaited from it. Otherwise each
                    # DATA the caller sends, which signals the socket's ZMQ_FD, would wake this
                    # thread to contend for the GIL with the caller (~60 us of CPU a message on
                    # an H100 host). FREEs that come meanwhile are read by the next send(), or
                    # by this thread within `timeout`.
                    watch = self._lease is None or self._waiting_space or bool(self._outbox)
                if timeout:
                    (poller if watch else wake_only).poll(timeout)
                with self._cond:
                    self._io_sleeping = False
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
        except Exception as exc:  # a bug or a broken backend: make send() fail loudly, not hang
            log.exception("%s: sender I/O thread failed", self.address)
            with self._cond:
                self._refused = (f"the sender's I/O thread failed: {exc!r}", False)
                self._cond.notify_all()
        finally:
            with self._cond:
                lease, self._lease = self._lease, None
                if lease is not None:
                    self._retire(lease)
                self._cond.notify_all()
            with self._sock_lock:
                sock, self._sock = self._sock, None
                if lease is not None:
                    self._try_send(sock, [b"detach", pack_ctrl(session=lease.session, lease=lease.index, gen=lease.gen)])
                sock.close(linger=100)

    @staticmethod
    def _try_send(sock: zmq.Socket, frames: list) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _send_data(self, sock: zmq.Socket, job: _Job) -> bool:
        """Hand one DATA message to zmq (one place, so the benchmark can time it)."""
        return self._try_send(sock, job.frames)

    def _drain_outbox(self, sock: zmq.Socket) -> tuple[int, bool, Fence | None]:
        """Send queued DATA in order, each once its writes have landed. Returns (messages sent,
        whether zmq pushed back, the fence of the oldest message if its writes are still going)."""
        sent = 0
        while True:
            with self._cond:
                if not self._outbox:
                    return sent, False, None
                job = self._outbox[0]
                stale = job.lease is not None and job.lease is not self._lease
            if stale:
                log.warning("%s: dropped a message whose lease expired before it was sent", self.address)
            else:
                try:
                    if job.fence is not None and not job.fence.done():
                        return sent, False, job.fence
                except TransportError as exc:  # the write failed: the span holds garbage
                    log.error("%s: dropped a message whose write failed: %s", self.address, exc)
                    job.frames = None
                if job.frames is not None and not self._send_data(sock, job):
                    return sent, True, None
                sent += job.frames is not None
            with self._cond:
                self._outbox.popleft()
                self._cond.notify_all()

    def _on_control(self, frames: list[bytes]) -> None:
        kind = frames[0] if frames else b""
        try:
            if len(frames) != 2:
                raise ProtocolError(f"control message with {len(frames)} frames")
            if kind == b"lease":
                self._on_lease(unpack_ctrl(frames[1], LEASE))
            elif kind == b"free":
                ctrl = unpack_ctrl(frames[1], FREE)
                with self._cond:
                    lease = self._lease
                    if lease and (ctrl["session"], ctrl["lease"], ctrl["gen"]) == (lease.session, lease.index, lease.gen):
                        for seq in ctrl["seqs"]:
                            lease.ring.free(seq)
                        self._cond.notify_all()
            elif kind == b"expired":
                ctrl = unpack_ctrl(frames[1], EXPIRED)
                with self._cond:
                    lease = self._lease
                    if lease is not None:
                        log.warning("%s: lease expired (%s); attaching again", self.address, ctrl["reason"])
                        self._lease = None
                        self._retire(lease)
                        self._cond.notify_all()
            elif kind == b"refuse":
                ctrl = unpack_ctrl(frames[1], REFUSE)
                with self._cond:
                    if self._refused != (ctrl["reason"], ctrl["retry"]):
                        log.warning("%s: attach refused: %s", self.address, ctrl["reason"])
                    self._refused = (ctrl["reason"], ctrl["retry"])
                    self._cond.notify_all()
            else:
                raise ProtocolError(f"unknown control message {kind!r:.40}")
        except ProtocolError as exc:
            log.warning("%s: ignored a control message: %s", self.address, exc.reason)

    def _on_lease(self, ctrl: dict[str, Any]) -> None:
        with self._cond:
            if self._lease is not None:  # a duplicate answer to a retried ATTACH
                return
        try:
            writer = self._open_writer(ctrl["export"], ctrl["offset"], ctrl["nbytes"])
        except TransportError as exc:  # e.g. the receiver's GPU is not visible here
            log.error("%s: cannot use the lease: %s", self.address, exc)
            with self._cond:
                self._refused = (str(exc), False)
                self._cond.notify_all()
            return
        with self._cond:
            self._lease = _Lease(ctrl["session"], ctrl["lease"], ctrl["gen"], ctrl["offset"], ctrl["nbytes"],
                                 writer, Ring(ctrl["nbytes"]))
            self._refused = None
            self._cond.notify_all()
