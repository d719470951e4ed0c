"""The receiving half of the region protocol (see transfer/region.py): owns the region, grants
and reclaims leases, validates DATA, copies payloads out and frees their spans."""

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
from transfer.region import ALIGN, ATTACH, DATA, NO_LEASE, PING, Fence, RegionMemory, pack_ctrl, unpack_ctrl
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
        sleeps or returns, so a sender whose lease is full never waits on an idle receiver."""
        deadline = deadline_after(timeout)
        self._forgive_own_absence()
        try:
            while True:
                self._flush_frees()
                self._expire_leases()
                ready = self._sock.poll(0, zmq.POLLIN)
                if not ready:
                    for fence, *_ in self._pending_free:
                        fence.wait()
                    self._flush_frees(idle=True)
                    wait = remaining_ms(deadline)  # wake now and then to expire leases
                    ready = wait != 0 and self._sock.poll(250 if wait is None else min(wait, 250), zmq.POLLIN)
                self._last_active = time.monotonic()
                if ready:
                    msg = self._on_frames(self._sock.recv_multipart(copy=False))
                    if msg is not None:
                        self._flush_frees()
                        self.stats.received += 1
                        return msg
                elif deadline is not None and time.monotonic() >= deadline:
                    return None
        finally:
            self._last_active = time.monotonic()

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

    def _on_frames(self, frames: list) -> Message | None:
        identity = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        try:
            if kind == b"data":
                return self._on_data(identity, frames[2:])
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
        self._expire_leases()
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

    def _on_data(self, identity: bytes, frames: list) -> Message | None:
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
            header = parse_header(frames[1], self._limits)
            payloads = self._payloads(header.frames, ctrl, frames[2:], holder)
            return assemble(header, payloads)
        except ProtocolError as exc:
            self._reject(exc.reason)
            return None
        finally:
            if holder is not None:  # free the span even when the message was refused
                nbytes = sum(s[1] for s in ctrl["spans"] if isinstance(s, list) and len(s) == 2 and isinstance(s[1], int))
                self._pending_free.append((self._memory.fence(), ctrl["lease"], holder.gen, ctrl["seq"], nbytes))

    def _payloads(self, specs: list[FrameSpec], ctrl: dict[str, Any], inline: list, holder: _Holder | None) -> list:
        spans = ctrl["spans"]
        if len(spans) != len(specs):
            raise ProtocolError(f"{len(spans)} spans for {len(specs)} frames")
        n_inline = sum(span is None for span in spans)
        if n_inline != len(inline):
            raise ProtocolError(f"{len(inline)} inline frames, spans call for {n_inline}")
        base = ctrl["lease"] * self._lease_bytes
        inline_iter = iter(inline)
        payloads = []
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
            payloads.append(self._memory.copy_out(base + offset, DTYPES[spec.dtype], spec.shape))  # the span is recycled
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
            log.info("%s: lease %d (gen %d) of sender %s released: %s", self.address, index, holder.gen, holder.sender[:8], why)
            self._leases[index] = None

    def _expire_leases(self) -> None:
        """Reclaim the leases of senders silent for lease_timeout (they ping every second)."""
        now = time.monotonic()
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
