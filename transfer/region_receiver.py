"""The receiving half of the region protocol (see transfer/region.py): owns the region, grants
and reclaims leases, validates DATA, holds it until its write fence says the data landed (in
order per sender), copies payloads out and frees their spans."""

from __future__ import annotations

import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from transfer.base import Receiver, ReceiverStats, TransportError
from transfer.codec import (
    BYTES,
    DEFAULT_LIMITS,
    DTYPES,
    FrameSpec,
    Limits,
    ProtocolError,
    assemble,
    parse_header,
    tensor_from_buffer,
)
from transfer.messages import Message
from transfer.region import ALIGN, ATTACH, DATA, MAX_BATCH, NO_LEASE, PING, Done, Fence, RegionMemory, pack_ctrl, unpack_ctrl
from transfer.zmq_transport import check_address, common_options, deadline_after, remaining_ms

log = logging.getLogger(__name__)


@dataclass
class _Holder:
    identity: bytes
    sender: str
    gen: int
    last_seen: float
    live: set[int] = field(default_factory=set)  # DATA seqs copied out but not yet freed
    done: list[int] = field(default_factory=list)  # seqs whose copy-out completed, FREE not sent yet
    done_bytes: int = 0
    urgent: bool = False  # the sender is short of space (DATA said low, or it PINGed): FREE when idle
    fences: dict[bytes, Any] = field(default_factory=dict)  # the sender's write fences, opened once


MAX_FENCES = 64  # write fences one lease may name (a cuda_ipc sender uses up to _CudaWriter.FENCE_EVENTS = 32)
EXPIRY_CHECK_S = 0.05
# recv() checks waiting messages' write fences continuously until this long has passed with
# nothing arriving or delivered, then backs off.
WRITE_SPIN_S = 1e-3
MAX_FENCE_POLL_S = 1e-3  # the longest back-off between checks (a dead sender's message waits for its lease's expiry)


@dataclass
class _Span:
    """A payload still in the region: its offset, dtype and shape (validated)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(eq=False)
class _Arrival:
    """A validated DATA message waiting for delivery (and, with a write fence, for its data).
    One DATA carries `count` messages (send_many), sharing one span and one fence."""

    sender: bytes  # its zmq identity: a sender's messages are delivered in the order it sent them
    holder: _Holder | None  # the lease's holder when it arrived; None: inline only (NO_LEASE)
    ctrl: dict[str, Any]
    messages: list[tuple[Any, list]]  # (header, payloads: tensors, bytes and _Spans) per message
    after: Any  # the sender's opened write fence, or None
    at: float = field(default_factory=time.monotonic)  # when it arrived


def fence_poll_sleep(now: float, newest_arrived: float, last_delivery: float) -> float:
    """How long recv() sleeps before it checks the waiting messages' write fences again: not at
    all (a yield) within WRITE_SPIN_S of the newest arrival or the last delivery, whichever is
    later (messages are coming in, or landing). Past that (nothing landing: e.g. a sender killed
    before its copy ran, whose message waits for its lease's reclaim) a tenth of the time
    waited, up to MAX_FENCE_POLL_S, so a slow write is seen within ~10% of its time."""
    waited = now - max(newest_arrived, last_delivery)
    return 0.0 if waited < WRITE_SPIN_S else min(MAX_FENCE_POLL_S, waited / 10)


def _landed(arrival: _Arrival) -> bool:
    """Whether the DATA's writes are done. An event whose sender has gone (exited, or closed
    its lease) reads as not done, or raises: either way its message waits and is dropped when
    the lease goes."""
    if arrival.after is None:
        return True
    try:
        return arrival.after.query()
    except RuntimeError:
        return False


class RegionReceiver(Receiver):
    """Owns the region and serves leases; recv() also runs the control protocol."""

    backend: str = ""

    def __init__(self, address: str, memory: RegionMemory, *, lease_bytes: int, max_senders: int,
                 lease_timeout: float = 10.0, limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None):
        check_address(address)
        if lease_bytes % ALIGN or lease_bytes <= 0:
            raise ValueError(f"lease_bytes must be a positive multiple of {ALIGN}")
        self._memory = memory
        self._lease_bytes = lease_bytes
        self._leases: list[_Holder | None] = [None] * max_senders
        self._gens = [0] * max_senders
        self._lease_timeout = lease_timeout
        self._last_active = time.monotonic()  # when recv() last looked at the socket
        self._limits = limits
        self._session = secrets.randbits(62) + 1
        self._arrived: collections.deque[_Arrival] = collections.deque()  # validated, not delivered yet
        self._ready: collections.deque[tuple[Message, list, Fence]] = collections.deque()  # copied out, for recv()
        self._next_expiry_check = 0.0
        self._last_delivery = 0.0  # when _deliver last copied a DATA out (recv()'s fence polling clock)
        self._pending_free: collections.deque[tuple[Fence, int, int, int, int]] = collections.deque()  # fence, lease, gen, seq, bytes
        self._sock = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        common_options(self._sock)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)  # FREE and LEASE must not be dropped
        self._sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            memory.close()
            raise TransportError(f"cannot bind {address}: {exc} (is another receiver running there?)") from exc
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stats = ReceiverStats()

    @property
    def leases_held(self) -> int:
        return sum(h is not None for h in self._leases)

    def recv(self, timeout: float | None = None) -> Message | None:
        """As Receiver.recv. Spans are freed as their copy-out completes, checked on every call:
        a consumer that stops calling recv() makes its senders wait (backpressure).

        Whenever nothing is waiting in the socket, the copy-outs still in flight are waited for
        (microseconds: they run on their own stream) and their spans freed before this call
        sleeps or returns, so a sender whose lease is full never waits on an idle receiver.
        A message whose sender's writes are still running (its write fence not done yet) waits
        here, checked continuously while messages keep landing and less often after WRITE_SPIN_S
        without one, while other messages are read and delivered."""
        if self._ready:  # the rest of a batch already copied out: no need to look at the socket
            return self._hand_over()
        deadline = deadline_after(timeout)
        self._forgive_own_absence()
        try:
            while True:
                self._flush_frees()
                self._expire_leases()
                if not self._ready and self._arrived:
                    self._deliver()
                if self._ready:
                    return self._hand_over()
                ready = self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN  # ~10x cheaper than poll(0)
                if not ready and self._arrived:  # only writes in flight (tens of microseconds): check back soon
                    self._flush_frees(idle=True)  # senders short of space must not wait on that
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        return None
                    # A write lands tens of microseconds to a lease's worth of link time (~1 ms
                    # for 256 MiB) after its DATA: the sender sends the DATA as soon as its copy
                    # is queued, behind everything it queued before. So while messages keep
                    # landing, yield the CPU and look again (a real sleep lasts >= ~60 us here).
                    # The clock is the newest arrival, or the last delivery if later: timed from
                    # the oldest arrival alone, a sender a lease ahead made every message wait
                    # ~1 ms and fall into the back-off below, idling the link (docs/transfer.md);
                    # and a dead sender's message at the head made a live one's back off at once.
                    time.sleep(fence_poll_sleep(now, self._arrived[-1].at, self._last_delivery))
                    continue
                if not ready:
                    for fence, *_ in self._pending_free:
                        fence.wait()
                    self._flush_frees(idle=True)
                    wait = remaining_ms(deadline)  # wake now and then to expire leases
                    ready = wait != 0 and self._sock.poll(250 if wait is None else min(wait, 250), zmq.POLLIN)
                self._last_active = time.monotonic()
                if ready:
                    self._on_frames(self._sock.recv_multipart(copy=False))  # delivered by the next turn
                elif deadline is not None and time.monotonic() >= deadline:
                    return None
        finally:
            self._last_active = time.monotonic()

    def _hand_over(self) -> Message:
        """The next copied-out message, usable on the caller's current stream (which may not be
        the stream its batch was copied out for)."""
        msg, tensors, fence = self._ready.popleft()
        self._memory.hand_over(tensors, fence)
        self.stats.received += 1
        return msg

    def _deliver(self) -> None:
        """Copy the oldest arrived DATA whose writes have landed out of the region, and queue
        its messages for recv(); in order per sender. Write fences are checked on the host, never
        waited for on our GPU: a sender that dies before its copy runs leaves an event that
        never completes, and a stream waiting on it would hang for good (seen on H200s). Its
        messages wait here instead, and are dropped when its lease is reclaimed."""
        blocked: set[bytes] = set()  # senders whose oldest message still waits for its writes
        for i, arrival in enumerate(self._arrived):
            if arrival.sender in blocked:
                continue
            lease = arrival.ctrl["lease"]
            if arrival.holder is not None and self._leases[lease] is not arrival.holder:  # reclaimed meanwhile
                del self._arrived[i]
                log.warning("%s: dropped %d message(s) of lease %d: the lease was reclaimed before its writes landed",
                            self.address, len(arrival.messages), lease)
                return
            if not _landed(arrival):
                blocked.add(arrival.sender)
                continue
            del self._arrived[i]
            self._copy_out(arrival)
            self._last_delivery = time.monotonic()
            return

    def _forgive_own_absence(self) -> None:
        """If the consumer did not call recv() for a while, the senders' pings are waiting in
        the socket, not missing: restart their silence clocks instead of expiring them."""
        now = time.monotonic()
        if now - self._last_active > self._lease_timeout / 2:
            for holder in self._leases:
                if holder is not None:
                    holder.last_seen = max(holder.last_seen, now)

    def _reject(self, reason: str) -> None:
        self.stats.rejected += 1
        log.warning("%s: dropped a message: %s", self.address, reason)

    def _reply(self, identity: bytes, kind: bytes, **fields: Any) -> None:
        try:
            self._sock.send_multipart([identity, kind, pack_ctrl(**fields)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the peer is gone; it will attach again if it comes back
            pass

    def _on_frames(self, frames: list) -> None:
        identity = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        try:
            if kind == b"data":
                self._on_data(identity, frames[2:])
                return
            if len(frames) != 3:
                raise ProtocolError(f"{kind!r:.40} control message with {len(frames) - 1} frames")
            if kind == b"attach":
                self._on_attach(identity, unpack_ctrl(frames[2].bytes, ATTACH))
            elif kind in (b"ping", b"detach"):
                ctrl = unpack_ctrl(frames[2].bytes, PING)
                holder = self._holder(identity, ctrl)
                holder.last_seen = time.monotonic()
                holder.urgent = True  # an idle sender's heartbeat, or one waiting for space
                if kind == b"detach":
                    self._release(ctrl["lease"], "detached")
            else:
                raise ProtocolError(f"unknown control message {kind!r:.40}")
        except ProtocolError as exc:
            self._reject(exc.reason)
        return None

    def _on_attach(self, identity: bytes, ctrl: dict[str, Any]) -> None:
        if ctrl["backend"] != self.backend:
            self._reply(identity, b"refuse", retry=False,
                        reason=f"this receiver speaks {self.backend!r}, not {ctrl['backend']!r}")
            return
        for index, holder in enumerate(self._leases):  # a sender attaching again drops its old lease
            if holder is not None and (holder.sender == ctrl["sender"] or holder.identity == identity):
                self._release(index, "re-attached")
        self._expire_leases(force=True)
        free = [i for i, h in enumerate(self._leases) if h is None]
        if not free:
            self._reply(identity, b"refuse", retry=True,
                        reason=f"all {len(self._leases)} leases are held; raise max_senders")
            return
        index = free[0]
        self._gens[index] += 1
        self._leases[index] = _Holder(identity, ctrl["sender"], self._gens[index], time.monotonic())
        log.info("%s: lease %d (gen %d) -> sender %s", self.address, index, self._gens[index], ctrl["sender"][:8])
        self._reply(identity, b"lease", session=self._session, lease=index, gen=self._gens[index],
                    offset=index * self._lease_bytes, nbytes=self._lease_bytes, export=self._memory.export())

    def _holder(self, identity: bytes, ctrl: dict[str, Any]) -> _Holder:
        """The live lease a control message names, or EXPIRED to its sender and ProtocolError."""
        index = ctrl["lease"]
        holder = self._leases[index] if index < len(self._leases) else None
        if ctrl["session"] != self._session or holder is None or holder.gen != ctrl["gen"] or holder.identity != identity:
            reason = "receiver restarted" if ctrl["session"] != self._session else "lease expired or not yours"
            self._reply(identity, b"expired", session=self._session, reason=reason)
            raise ProtocolError(f"message for lease {index} gen {ctrl['gen']}: {reason}")
        return holder

    def _on_data(self, identity: bytes, frames: list) -> None:
        """Validate a DATA message completely and queue it for delivery (see _deliver)."""
        if len(frames) < 2:
            raise ProtocolError(f"DATA with {len(frames)} frames")
        ctrl = unpack_ctrl(frames[0].bytes, DATA)
        holder = None
        if ctrl["lease"] != NO_LEASE:
            holder = self._holder(identity, ctrl)
            holder.last_seen = time.monotonic()
            holder.live.add(ctrl["seq"])
            holder.urgent |= ctrl["low"]
        try:
            count = ctrl["count"]
            if not 1 <= count <= min(MAX_BATCH, len(frames) - 1):
                raise ProtocolError(f"DATA says it carries {count} messages (1 to {MAX_BATCH}, one header frame each)")
            headers = [parse_header(frame, self._limits) for frame in frames[1 : 1 + count]]
            after = self._write_fence(ctrl["fence"], holder)
            payloads = self._payloads([spec for header in headers for spec in header.frames], ctrl,
                                      frames[1 + count :], holder)
        except BaseException as exc:  # free the span even when the message was refused (or we failed)
            if holder is not None:
                nbytes = sum(s[1] for s in ctrl["spans"] if isinstance(s, list) and len(s) == 2 and isinstance(s[1], int))
                self._pending_free.append((Done(), ctrl["lease"], holder.gen, ctrl["seq"], nbytes))
            if not isinstance(exc, ProtocolError):
                raise  # ours (e.g. out of GPU memory for an inline tensor), not the peer's
            self._reject(exc.reason)
            return
        messages, at = [], 0
        for header in headers:  # each message's own payloads, in frame order
            messages.append((header, payloads[at : at + len(header.frames)]))
            at += len(header.frames)
        self._arrived.append(_Arrival(identity, holder, ctrl, messages, after))

    def _copy_out(self, arrival: _Arrival) -> None:
        """Copy the DATA's region payloads out (all together), queue the FREE of its span for
        when that copy is done (or at once if it failed), and its messages for recv()."""
        ctrl = arrival.ctrl
        from_region = [(payloads, i, item) for _, payloads in arrival.messages
                       for i, item in enumerate(payloads) if isinstance(item, _Span)]
        try:
            if from_region:
                outs = self._memory.copy_out([(item.offset, item.dtype, item.shape) for *_, item in from_region])
                for (payloads, i, _), out in zip(from_region, outs, strict=True):
                    payloads[i] = out
        finally:  # on a failure too (e.g. out of GPU memory): the span goes back once what was issued is done
            fence = self._memory.fence()
            if arrival.holder is not None:
                nbytes = sum(span[1] for span in ctrl["spans"] if span is not None)
                self._pending_free.append((fence, ctrl["lease"], arrival.holder.gen, ctrl["seq"], nbytes))
        for header, payloads in arrival.messages:
            self._ready.append((assemble(header, payloads), [p for p in payloads if isinstance(p, torch.Tensor)], fence))

    def _write_fence(self, wire: bytes, holder: _Holder | None) -> Any:
        """The opened write fence a DATA names (None: its writes landed before it was sent)."""
        if not wire:
            return None
        if holder is None:
            raise ProtocolError("a DATA message without a lease names a write fence")
        fence = holder.fences.get(wire)
        if fence is None:
            if len(holder.fences) >= MAX_FENCES:
                raise ProtocolError(f"the sender named more than {MAX_FENCES} write fences")
            fence = holder.fences[wire] = self._memory.open_fence(wire)
        return fence

    def _payloads(self, specs: list[FrameSpec], ctrl: dict[str, Any], inline: list, holder: _Holder | None) -> list:
        """The message's payloads: inline ones decoded, region ones as a checked _Span."""
        spans = ctrl["spans"]
        if len(spans) != len(specs):
            raise ProtocolError(f"{len(spans)} spans for {len(specs)} frames")
        n_inline = sum(span is None for span in spans)
        if n_inline != len(inline):
            raise ProtocolError(f"{len(inline)} inline frames, spans call for {n_inline}")
        base = ctrl["lease"] * self._lease_bytes
        inline_iter = iter(inline)
        payloads: list = []
        for spec, span in zip(specs, spans, strict=True):
            if span is None:
                frame = next(inline_iter)
                size = memoryview(frame).nbytes
                if size != spec.nbytes:
                    raise ProtocolError(f"frame {spec.field!r}: {size} bytes, but {spec.dtype}{list(spec.shape)} needs {spec.nbytes}")
                if spec.dtype == BYTES:
                    payloads.append(bytes(frame))
                elif spec.nbytes == 0:  # empty tensors travel inline, but belong on our device too
                    payloads.append(torch.empty(spec.shape, dtype=DTYPES[spec.dtype], device=self._memory.device))
                else:  # too large for the lease: came through host memory
                    payloads.append(tensor_from_buffer(frame, spec).to(self._memory.device))
                continue
            if holder is None or spec.dtype == BYTES:
                raise ProtocolError(f"frame {spec.field!r} names a region span it may not use")
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
                raise ProtocolError(f"bad span {span!r:.60}")
            offset, nbytes = span
            if nbytes != spec.nbytes or offset % ALIGN or not 0 <= offset <= self._lease_bytes - nbytes:
                raise ProtocolError(f"span {span} does not fit lease of {self._lease_bytes} bytes for {spec.nbytes}-byte {spec.field!r}")
            payloads.append(_Span(base + offset, DTYPES[spec.dtype], spec.shape))
        return payloads

    def _flush_frees(self, idle: bool = False) -> None:
        """FREE the spans whose copy-out completed. A FREE costs about as much as a DATA to
        handle (a ROUTER send here, a wake-up and a receive at the sender), so they are batched,
        up to half a lease; `idle` (nothing left to read) also sends what is done for senders
        that are short of space (`urgent`), so an idle receiver never holds a sender up."""
        while self._pending_free and self._pending_free[0][0].done():
            _, index, gen, seq, nbytes = self._pending_free.popleft()
            holder = self._leases[index]
            if holder is not None and holder.gen == gen:
                holder.live.discard(seq)
                holder.done.append(seq)
                holder.done_bytes += nbytes
        for index, holder in enumerate(self._leases):
            if holder is None:
                continue
            if holder.done and (2 * holder.done_bytes >= self._lease_bytes or (idle and holder.urgent)):
                self._reply(holder.identity, b"free", session=self._session, lease=index, gen=holder.gen, seqs=holder.done)
                holder.done, holder.done_bytes = [], 0
            if idle and not holder.live:  # every span it sent is back: it has all the room there is
                holder.urgent = False

    def _release(self, index: int, why: str) -> None:
        holder = self._leases[index]
        if holder is not None:
            # Its messages whose writes have landed are copied out now, before the lease can be
            # granted again and written over (a DETACH right behind the last DATA, say).
            for arrival in [a for a in self._arrived if a.holder is holder]:
                if not _landed(arrival):
                    break
                self._arrived.remove(arrival)  # by identity (eq=False)
                self._copy_out(arrival)
            log.info("%s: lease %d (gen %d) of sender %s released: %s", self.address, index, holder.gen, holder.sender[:8], why)
            self._leases[index] = None

    def _expire_leases(self, force: bool = False) -> None:
        """Reclaim the leases of senders silent for lease_timeout (they ping every second).
        Looked at every EXPIRY_CHECK_S at most: recv() calls this on every turn."""
        now = time.monotonic()
        if now < self._next_expiry_check and not force:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_S
        for index, holder in enumerate(self._leases):
            if holder is not None and now - holder.last_seen > self._lease_timeout:
                self._release(index, f"silent for {now - holder.last_seen:.1f}s")

    def close(self) -> None:
        for fence, *_ in self._pending_free:
            fence.wait()
        for holder in self._leases:  # tell senders now, so they stop writing into the region
            if holder is not None:
                self._reply(holder.identity, b"expired", session=self._session, reason="receiver closed")
        self._sock.close(linger=200)
        self._memory.close()
