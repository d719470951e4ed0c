"""Receiver-owned memory regions: the shared protocol of the cuda_ipc, shm and nixl transports.

The receiver owns one region (GPU memory for cuda_ipc, a memfd for shm, registered memory for
nixl) cut into `max_senders` leases. A sender attaches over zmq and is granted one lease; it
then writes tensor payloads straight into its lease (device to device for cuda_ipc: no host
staging) and sends a small DATA control message naming the spans. The receiver copies each
payload out of the region (on the region's device, ~10x faster than the link that filled it)
and FREEs the span, so the sender's ring of spans is recycled. Nothing big crosses zmq.

    sender                                   receiver (ROUTER, owns the region)
      ATTACH {sender, info}          ->
                                     <-      LEASE {session, lease, gen, offset, nbytes, export}
      write payloads into the lease, wait until they landed
      DATA {lease, gen, seq, spans} + codec header + inline frames ->
                                             validate, copy out, return the message
                                     <-      FREE {lease, gen, seqs}
      PING (when idle) / DETACH      ->      EXPIRED {reason} for an unknown or stale lease

Safety:
- A DATA message is only sent after the sender's writes completed, and a span is only FREEd
  after the receiver's copy-out completed, so neither side ever sees half-written data.
- Every control field and span is validated (bounds, alignment, owner, generation); the codec
  header is validated as for zmq. A bad message is logged and dropped, and its span still freed.
- A sender that dies stops pinging; after `lease_timeout` its lease is reclaimed (generation
  bumped, so late messages for it are refused) and handed to the next sender. A receiver that
  restarts has a new session: old senders get EXPIRED and attach again. Messages in flight
  across a restart are lost, never half-delivered.
- Payloads too large for a lease, bytes fields and empty tensors travel inline as zmq frames.
"""

from __future__ import annotations

import abc
import collections
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import torch
import zmq

from transfer.base import Receiver, ReceiverStats, Sender, TransportError, TransportTimeout
from transfer.codec import (
    BYTES,
    DEFAULT_LIMITS,
    DTYPES,
    FrameSpec,
    Limits,
    ProtocolError,
    assemble,
    host_buffer,
    pack_header,
    parse_header,
    split_message,
    tensor_from_buffer,
)
from transfer.messages import PROTOCOL_VERSION, Message
from transfer.zmq_transport import _check_address, _common_options, _deadline, _remaining_ms

log = logging.getLogger(__name__)

ALIGN = 256  # span alignment: what cudaMalloc guarantees, enough for any dtype and vector loads
HEARTBEAT_S = 1.0  # an idle sender pings this often
ATTACH_RETRY_S = 0.5  # a sender without a lease asks again this often


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ----------------------------------------------------------------------- backend interface


class Fence(abc.ABC):
    """Completes when the writes (or reads) issued before it was taken are done."""

    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def wait(self) -> None: ...


class Done(Fence):
    """For backends whose writes are synchronous."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class RegionMemory(abc.ABC):
    """The receiver's region."""

    device: torch.device

    @abc.abstractmethod
    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 tensor aliasing region bytes [offset, offset + nbytes)."""

    @abc.abstractmethod
    def export(self) -> dict[str, Any]:
        """What one sender needs to write into the region (msgpack-able). Called once per
        granted lease, so a backend can count its importers (cuda_ipc does)."""

    def fence(self) -> Fence:
        """Completes when copies out of the region issued so far are done."""
        return Done()

    @abc.abstractmethod
    def close(self) -> None: ...


class RegionWriter(abc.ABC):
    """A sender's handle on a receiver's region."""

    @abc.abstractmethod
    def write(self, offset: int, src: torch.Tensor) -> None:
        """Start copying the contiguous uint8 tensor `src` to region offset `offset`."""

    @abc.abstractmethod
    def fence(self) -> Fence:
        """Completes when all writes started so far have landed in the region."""

    @abc.abstractmethod
    def close(self) -> None: ...


# ------------------------------------------------------------------------ control messages


def _unpack_ctrl(raw: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Decode and check one control map: exactly the schema's keys, each of its type."""
    try:
        ctrl = msgpack.unpackb(raw, raw=False, strict_map_key=True, timestamp=0,
                               ext_hook=lambda code, data: ProtocolError("ext"))
    except Exception as exc:
        raise ProtocolError(f"control message is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(ctrl, dict) or set(ctrl) != set(schema) | {"v"}:
        raise ProtocolError(f"control message keys {sorted(map(str, ctrl)) if isinstance(ctrl, dict) else ctrl!r:.100} "
                            f"!= {sorted(set(schema) | {'v'})}")
    if ctrl["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {ctrl['v']!r} (this build speaks {PROTOCOL_VERSION})")
    for key, kind in schema.items():
        value = ctrl[key]
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ProtocolError(f"control field {key!r} has a bad value {value!r:.60}")
    return ctrl


def _pack_ctrl(**fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields}, use_bin_type=True)


_ATTACH = {"sender": str, "backend": str}
_LEASE = {"session": int, "lease": int, "gen": int, "offset": int, "nbytes": int, "export": dict}
_DATA = {"session": int, "lease": int, "gen": int, "seq": int, "spans": list}
_PING = {"session": int, "lease": int, "gen": int}
_FREE = {"session": int, "lease": int, "gen": int, "seqs": list}
_EXPIRED = {"session": int, "reason": str}
_REFUSE = {"reason": str, "retry": bool}  # retry: a lease may come free later
NO_LEASE = (1 << 63) - 1  # DATA with only inline frames names no lease


# --------------------------------------------------------------------------- the sender


class Ring:
    """Spans of a lease in allocation order; space returns when the oldest spans are freed."""

    def __init__(self, size: int):
        self.size = size
        self.live: collections.deque[list] = collections.deque()  # [seq, start, end, freed]

    def alloc(self, seq: int, n: int) -> int | None:
        if not self.live:
            start = 0 if n <= self.size else None
        else:
            oldest, newest_end = self.live[0][1], self.live[-1][2]
            if self.live[-1][1] >= oldest:  # not wrapped: free space at the end and the start
                start = newest_end if self.size - newest_end >= n else (0 if oldest >= n else None)
            else:  # wrapped: free space between the newest and the oldest span
                start = newest_end if oldest - newest_end >= n else None
        if start is not None:
            self.live.append([seq, start, start + n, False])
        return start

    def free(self, seq: int) -> None:
        for span in self.live:
            if span[0] == seq:
                span[3] = True
        while self.live and self.live[0][3]:
            self.live.popleft()


@dataclass
class _Lease:
    session: int
    index: int
    gen: int
    offset: int  # of the lease in the region
    nbytes: int
    writer: RegionWriter
    ring: Ring


@dataclass
class _Job:
    frames: list  # [kind, ctrl, header, inline frames...]
    fence: Fence | None
    lease: _Lease | None  # None: inline only, needs no lease
    seq: int = 0


class RegionSender(Sender):
    """Sends messages through a receiver's region; see the module docstring for the protocol.

    `open_writer(export, offset, nbytes)` builds the backend's writer from the receiver's export
    and the lease's place in the region.
    Not thread-safe (like a zmq socket): one thread calls send().
    """

    backend: str = ""

    def __init__(self, address: str, open_writer: Callable[[dict[str, Any], int, int], RegionWriter], *,
                 max_pending: int = 8, limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None):
        _check_address(address)
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
        self._stop = False
        self._warned_inline = False
        wake = f"inproc://region-sender-{self._id}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake)
        self._thread = threading.Thread(target=self._io_loop, name=f"{self.backend}-sender", daemon=True)
        self._thread.start()

    # -- caller's thread

    def send(self, msg: Message, timeout: float | None = None) -> None:
        header, payloads = split_message(msg, self._limits)
        deadline = _deadline(timeout)
        direct = [i for i, (spec, p) in enumerate(payloads) if isinstance(p, torch.Tensor) and spec.nbytes > 0]
        total = sum(_align(payloads[i][0].nbytes) for i in direct)
        with self._cond:
            self._wait(lambda: len(self._outbox) < self._max_pending, deadline, "the receiver is not consuming")
            while True:  # until the message is in a lease that is still ours
                spans: list[list[int] | None] = [None] * len(payloads)
                lease, fence, seq = None, None, 0
                if direct:
                    lease = self._wait(lambda: self._lease, deadline, "no lease from the receiver", lease=True)
                if lease is not None and total > lease.nbytes:
                    if not self._warned_inline:
                        log.warning("%s: a %d-byte message exceeds the %d-byte lease; sending it inline "
                                    "through host memory (raise lease_bytes on the receiver)",
                                    self.address, total, lease.nbytes)
                        self._warned_inline = True
                    lease = None
                if lease is None:
                    break
                self._seq += 1
                seq = self._seq
                start = self._wait(lambda: lease.ring.alloc(seq, total) if lease is self._lease else -1,
                                   deadline, "the receiver's region is full (it is not freeing spans)")
                if start is None or start < 0:  # the lease expired while we waited: use the next one
                    continue
                at = start
                for i in direct:
                    spec, tensor = payloads[i]
                    lease.writer.write(lease.offset + at, tensor.reshape(-1).view(torch.uint8))
                    spans[i] = [at, spec.nbytes]
                    at += _align(spec.nbytes)
                fence = lease.writer.fence()
                break
            ctrl = _pack_ctrl(session=lease.session if lease else 0, lease=lease.index if lease else NO_LEASE,
                              gen=lease.gen if lease else 0, seq=seq, spans=spans)
            inline = [host_buffer(p) for (_, p), span in zip(payloads, spans) if span is None]
            self._outbox.append(_Job([b"data", ctrl, pack_header(header), *inline], fence, lease, seq))
            self._wake()

    def _wait(self, ready: Callable[[], Any], deadline: float | None, why: str, lease: bool = False) -> Any:
        """Wait on the condition until `ready()` is not None/False; raise at the deadline, or at
        once when waiting for a lease the receiver refused for good."""
        while True:
            if lease and self._refused and not self._refused[1]:
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
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # already woken
            pass

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._wake()
        self._thread.join(5)
        self._wake_tx.close(0)

    # -- I/O thread: owns the DEALER socket

    def _io_loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        _common_options(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 2 * self._max_pending + 8)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        next_attach, last_sent, blocked = 0.0, time.monotonic(), False
        try:
            while True:
                events = dict(poller.poll(5 if blocked else 100))
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                while sock.poll(0):
                    self._on_control(sock.recv_multipart())
                with self._cond:
                    if self._stop:
                        break
                    lease = self._lease
                now = time.monotonic()
                if lease is None and now >= next_attach:
                    # Keep asking after a refusal too (slowly if it was final): leases come free,
                    # receivers get reconfigured.
                    final = self._refused is not None and not self._refused[1]
                    next_attach = now + (8 if final else 1) * ATTACH_RETRY_S
                    self._try_send(sock, [b"attach", _pack_ctrl(sender=self._id, backend=self.backend)])
                sent, blocked = self._drain_outbox(sock)
                if sent:
                    last_sent = now
                elif lease is not None and now - last_sent >= HEARTBEAT_S:
                    if self._try_send(sock, [b"ping", _pack_ctrl(session=lease.session, lease=lease.index, gen=lease.gen)]):
                        last_sent = now
        finally:
            with self._cond:
                lease, self._lease = self._lease, None
            if lease is not None:
                self._try_send(sock, [b"detach", _pack_ctrl(session=lease.session, lease=lease.index, gen=lease.gen)])
                lease.writer.close()
            sock.close(linger=100)
            self._wake_rx.close(0)

    @staticmethod
    def _try_send(sock: zmq.Socket, frames: list) -> bool:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _drain_outbox(self, sock: zmq.Socket) -> tuple[int, bool]:
        """Send queued DATA in order, each once its writes have landed.
        Returns (messages sent, whether zmq pushed back)."""
        sent = 0
        while True:
            with self._cond:
                if not self._outbox:
                    return sent, False
                job = self._outbox[0]
                stale = job.lease is not None and job.lease is not self._lease
            if stale:
                log.warning("%s: dropped a message whose lease expired before it was sent", self.address)
            else:
                if job.fence is not None:
                    job.fence.wait()  # releases the GIL while the copy finishes
                if not self._try_send(sock, job.frames):
                    return sent, True
                sent += 1
            with self._cond:
                self._outbox.popleft()
                self._cond.notify_all()

    def _on_control(self, frames: list[bytes]) -> None:
        kind = frames[0] if frames else b""
        try:
            if len(frames) != 2:
                raise ProtocolError(f"control message with {len(frames)} frames")
            if kind == b"lease":
                self._on_lease(_unpack_ctrl(frames[1], _LEASE))
            elif kind == b"free":
                ctrl = _unpack_ctrl(frames[1], _FREE)
                with self._cond:
                    lease = self._lease
                    if lease and (ctrl["session"], ctrl["lease"], ctrl["gen"]) == (lease.session, lease.index, lease.gen):
                        for seq in ctrl["seqs"]:
                            lease.ring.free(seq)
                        self._cond.notify_all()
            elif kind == b"expired":
                ctrl = _unpack_ctrl(frames[1], _EXPIRED)
                with self._cond:
                    lease = self._lease
                    if lease is not None:
                        log.warning("%s: lease expired (%s); attaching again", self.address, ctrl["reason"])
                        self._lease = None
                        lease.writer.close()
                        self._cond.notify_all()
            elif kind == b"refuse":
                ctrl = _unpack_ctrl(frames[1], _REFUSE)
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


# ------------------------------------------------------------------------- the receiver


@dataclass
class _Holder:
    identity: bytes
    sender: str
    gen: int
    last_seen: float
    live: set[int] = field(default_factory=set)  # DATA seqs copied out but not yet freed


class RegionReceiver(Receiver):
    """Owns the region and serves leases; recv() also runs the control protocol."""

    backend: str = ""

    def __init__(self, address: str, memory: RegionMemory, *, lease_bytes: int, max_senders: int,
                 lease_timeout: float = 10.0, limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None):
        _check_address(address)
        if lease_bytes % ALIGN or lease_bytes <= 0:
            raise ValueError(f"lease_bytes must be a positive multiple of {ALIGN}")
        self._memory = memory
        self._lease_bytes = lease_bytes
        self._leases: list[_Holder | None] = [None] * max_senders
        self._gens = [0] * max_senders
        self._lease_timeout = lease_timeout
        self._limits = limits
        self._session = secrets.randbits(62) + 1
        self._pending_free: collections.deque[tuple[Fence, int, int, int]] = collections.deque()
        self._sock = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        _common_options(self._sock)
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
        a consumer that stops calling recv() makes its senders wait (backpressure)."""
        deadline = _deadline(timeout)
        while True:
            self._flush_frees()
            wait = _remaining_ms(deadline)
            if self._pending_free:  # come back soon to free what is being copied out
                wait = 1 if wait is None else min(wait, 1)
            if self._sock.poll(wait, zmq.POLLIN):
                msg = self._on_frames(self._sock.recv_multipart(copy=False))
                if msg is not None:
                    self._flush_frees()
                    self.stats.received += 1
                    return msg
                continue
            self._expire_leases()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _reject(self, reason: str) -> None:
        self.stats.rejected += 1
        log.warning("%s: dropped a message: %s", self.address, reason)

    def _reply(self, identity: bytes, kind: bytes, **fields: Any) -> None:
        try:
            self._sock.send_multipart([identity, kind, _pack_ctrl(**fields)], flags=zmq.NOBLOCK)
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
                self._on_attach(identity, _unpack_ctrl(frames[2].bytes, _ATTACH))
            elif kind in (b"ping", b"detach"):
                ctrl = _unpack_ctrl(frames[2].bytes, _PING)
                holder = self._holder(identity, ctrl)
                holder.last_seen = time.monotonic()
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
        ctrl = _unpack_ctrl(frames[0].bytes, _DATA)
        holder = None
        if ctrl["lease"] != NO_LEASE:
            holder = self._holder(identity, ctrl)
            holder.last_seen = time.monotonic()
            holder.live.add(ctrl["seq"])
        try:
            header = parse_header(frames[1], self._limits)
            payloads = self._payloads(header.frames, ctrl, frames[2:], holder)
            return assemble(header, payloads)
        except ProtocolError as exc:
            self._reject(exc.reason)
            return None
        finally:
            if holder is not None:  # free the span even when the message was refused
                self._pending_free.append((self._memory.fence(), ctrl["lease"], holder.gen, ctrl["seq"]))

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
        for spec, span in zip(specs, spans):
            if span is None:
                frame = next(inline_iter)
                size = memoryview(frame).nbytes
                if size != spec.nbytes:
                    raise ProtocolError(f"frame {spec.field!r}: {size} bytes, but {spec.dtype}{list(spec.shape)} needs {spec.nbytes}")
                payloads.append(bytes(frame) if spec.dtype == BYTES else tensor_from_buffer(frame, spec))
                continue
            if holder is None or spec.dtype == BYTES:
                raise ProtocolError(f"frame {spec.field!r} names a region span it may not use")
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
                raise ProtocolError(f"bad span {span!r:.60}")
            offset, nbytes = span
            if nbytes != spec.nbytes or offset % ALIGN or not 0 <= offset <= self._lease_bytes - nbytes:
                raise ProtocolError(f"span {span} does not fit lease of {self._lease_bytes} bytes for {spec.nbytes}-byte {spec.field!r}")
            region = self._memory.view(base + offset, nbytes)
            payloads.append(region.view(DTYPES[spec.dtype]).reshape(spec.shape).clone())  # copy out: the span is recycled
        return payloads

    def _flush_frees(self) -> None:
        by_sender: dict[tuple[int, int], list[int]] = {}
        while self._pending_free and self._pending_free[0][0].done():
            _, index, gen, seq = self._pending_free.popleft()
            holder = self._leases[index]
            if holder is not None and holder.gen == gen:
                holder.live.discard(seq)
                by_sender.setdefault((index, gen), []).append(seq)
        for (index, gen), seqs in by_sender.items():
            self._reply(self._leases[index].identity, b"free", session=self._session, lease=index, gen=gen, seqs=seqs)

    def _release(self, index: int, why: str) -> None:
        holder = self._leases[index]
        if holder is not None:
            log.info("%s: lease %d (gen %d) of sender %s released: %s", self.address, index, holder.gen, holder.sender[:8], why)
            self._leases[index] = None

    def _expire_leases(self) -> None:
        """Reclaim leases whose sender went silent. Only runs with no input pending, so a
        receiver that was itself busy reads the senders' pings before judging them."""
        if self._sock.poll(0, zmq.POLLIN):
            return
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
