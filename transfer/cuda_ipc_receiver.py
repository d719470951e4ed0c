"""The receiving end of `cuda_ipc` (encode and language services on different GPUs of one
node): owns the region on its GPU, grants and reclaims leases, checks each DATA, holds it until
its write fence is done (in order per sender), copies its payloads out and frees their spans.
transfer/leases.py describes the protocol and its safety rules. No pickle and no
torch.multiprocessing: the region is exported by its storage's own `_share_cuda_()` handle (the
call torch.multiprocessing makes), whose bytes travel in the msgpack LEASE message.

recv() runs the protocol, on its caller's thread alone (like a zmq socket, not thread-safe).
"""

from __future__ import annotations

import collections
import logging
import math
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
    Header,
    Limits,
    ProtocolError,
    assemble,
    frame_payload,
    parse_header,
)
from transfer.leases import ALIGN, ATTACH, DATA, IPC_EVENT_BYTES, MAX_EVENTS, PING, pack_ctrl, unpack_ctrl
from transfer.messages import Message
from transfer.zmq_transport import check_address, common_options, deadline_after, remaining_ms

log = logging.getLogger(__name__)

# How often recv() queries the write fence of a message that arrived before its data landed.
# A host wait cannot be used: a dead sender's fence never completes.
FENCE_POLL_MS = 1
IDLE_POLL_MS = 250  # an idle recv() wakes this often to reclaim the leases of dead senders
MAX_FENCES = 2 * MAX_EVENTS  # write fences one lease may name
_Span = tuple[int, torch.dtype, tuple[int, ...]]  # offset in the region, dtype, shape


class GpuRegion:
    """The receiver's region: one GPU allocation, exported by CUDA IPC handle, and the copies
    out of it. They run on the caller's current stream, where the tensors will be used: behind
    its queued work, as their first use would be anyway; only the FREE of the span waits for it."""

    def __init__(self, nbytes: int, device: str | torch.device):
        if not torch.cuda.is_available():
            raise TransportError("cuda_ipc needs a CUDA GPU; use the zmq transport on CPU")
        self.device = torch.device(device)
        if self.device.type != "cuda" or self.device.index is None:
            raise TransportError(f"cuda_ipc region device must be cuda:N, got {device!r}")
        self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def export(self) -> dict[str, Any]:
        # A fresh export per lease: torch counts each export's importer, and memory an importer
        # still maps is kept out of the allocator's reuse until that importer lets go, so closing
        # the receiver can never hand a live sender's span to other tensors.
        _, *shared = self._buf.untyped_storage()._share_cuda_()
        keys = ("handle", "size", "offset", "ref_counter", "ref_counter_offset", "event_handle", "event_sync")
        return {
            "uuid": str(torch.cuda.get_device_properties(self.device.index).uuid),
            **dict(zip(keys, shared, strict=True)),
            "event_sync": bool(shared[-1]),
        }

    def open_fence(self, wire: bytes) -> torch.cuda.Event:
        """A sender's write fence (an interprocess event handle), opened to be queried."""
        return torch.cuda.Event.from_ipc_handle(self.device, wire)

    def copy_out(self, spans: list[_Span]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """New tensors holding the bytes of each span, and the event that completes when the
        copies are done (then the spans may be freed)."""
        outs = [
            self._buf[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape).clone()
            for offset, dtype, shape in spans
        ]
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return outs, done

    def synchronize(self) -> None:
        """Wait for every copy-out issued so far (on the current stream)."""
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._buf = None


@dataclass
class _Holder:
    identity: bytes  # the sender's zmq identity
    sender: str
    gen: int
    last_seen: float
    fences: dict[bytes, Any] = field(default_factory=dict)  # its write fences, opened once


@dataclass(eq=False)
class _Arrival:  # a validated DATA message waiting for its write fence
    holder: _Holder
    index: int
    seq: int
    header: Header
    payloads: list  # tensors and bytes that came inline; (offset, dtype, shape) of those in the region
    fence: Any  # the sender's opened write fence, or None (nothing in the region)


class CudaIpcReceiver(Receiver):
    """Owns the region and serves leases; recv() also runs the control protocol, so a consumer
    that stops calling it makes its senders wait (backpressure)."""

    region_type: type = GpuRegion

    def __init__(
        self,
        address: str,
        *,
        device: str | torch.device = "cuda:0",
        lease_bytes: int = 64 << 20,
        max_senders: int = 4,
        lease_timeout: float = 10.0,
        limits: Limits = DEFAULT_LIMITS,
        context: zmq.Context | None = None,
    ):
        check_address(address)
        if lease_bytes <= 0 or lease_bytes % ALIGN:
            raise ValueError(f"lease_bytes must be a positive multiple of {ALIGN}")
        self._region = self.region_type(lease_bytes * max_senders, device)
        self._lease_bytes = lease_bytes
        self._leases: list[_Holder | None] = [None] * max_senders
        self._gens = [0] * max_senders
        self._timeout = lease_timeout
        self._limits = limits
        self._session = secrets.randbits(62) + 1
        self._arrived: collections.deque[_Arrival] = collections.deque()  # oldest first
        self._ready: collections.deque[Message] = collections.deque()  # copied out
        self._copies: collections.deque[tuple[Any, int, int, int]] = collections.deque()  # (done, lease, gen, seq)
        self._last_active = time.monotonic()  # when recv() last returned
        self._sock = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        common_options(self._sock)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)  # FREE and LEASE must not be dropped
        self._sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            self._region.close()
            raise TransportError(f"cannot bind {address}: {exc} (is another receiver running there?)") from exc
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stats = ReceiverStats()

    @property
    def leases_held(self) -> int:
        return sum(h is not None for h in self._leases)

    def recv(self, timeout: float | None = None) -> Message | None:
        deadline = deadline_after(timeout)
        self._forgive_own_absence()
        try:
            while True:
                self._free_copied()
                self._expire_leases(stuck_only=True)
                if not self._ready:
                    self._deliver()
                if self._ready:
                    self.stats.received += 1
                    return self._ready.popleft()
                # Data still landing, or spans to free once copied out: look again soon.
                wait = FENCE_POLL_MS if self._arrived or self._copies else IDLE_POLL_MS
                left = remaining_ms(deadline)
                if self._sock.poll(wait if left is None else min(wait, left), zmq.POLLIN):
                    self._on_frames(self._sock.recv_multipart(copy=False))
                elif left == 0:
                    return None
        finally:
            self._last_active = time.monotonic()

    def close(self) -> None:
        for index, holder in enumerate(self._leases):  # tell senders now, so they stop writing
            if holder is not None:
                self._reply(
                    holder.identity,
                    b"expired",
                    session=self._session,
                    lease=index,
                    gen=holder.gen,
                    reason="receiver closed",
                )
        self._sock.close(linger=200)
        self._region.close()

    # -- delivery

    def _deliver(self) -> None:
        """Copy out the oldest arrival whose write fence is done, in order per sender."""
        blocked: set[bytes] = set()  # senders whose oldest message still waits for its data
        for i, arrival in enumerate(self._arrived):
            if arrival.holder.identity in blocked:
                continue
            if not _landed(arrival):
                blocked.add(arrival.holder.identity)
                continue
            del self._arrived[i]
            self._copy_out(arrival)
            return

    def _copy_out(self, arrival: _Arrival) -> None:
        """Copy the payloads out of the region, queue the FREE for when that is done, and the message."""
        payloads = arrival.payloads
        at = [i for i, p in enumerate(payloads) if isinstance(p, tuple)]
        if at:
            try:
                outs, done = self._region.copy_out([payloads[i] for i in at])
            except BaseException:  # e.g. out of GPU memory: the span still goes back
                self._region.synchronize()
                self._copies.append((None, arrival.index, arrival.holder.gen, arrival.seq))
                raise
            for i, out in zip(at, outs, strict=True):
                payloads[i] = out
            self._copies.append((done, arrival.index, arrival.holder.gen, arrival.seq))
        self._ready.append(assemble(arrival.header, payloads))

    def _free_copied(self, wait: bool = False) -> None:
        """FREE the spans whose copy-out is done, checked on the host so that the caller's stream
        keeps its queued work (`wait`: wait for all of them)."""
        while self._copies:
            done, index, gen, seq = self._copies[0]
            if done is not None and not done.query():
                if not wait:
                    return
                done.synchronize()
            self._copies.popleft()
            holder = self._leases[index]
            if holder is not None and holder.gen == gen:
                self._reply(holder.identity, b"free", session=self._session, lease=index, gen=gen, seq=seq)

    # -- control messages

    def _on_frames(self, frames: list) -> None:
        identity = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        try:
            if kind == b"data":
                if len(frames) < 4:
                    raise ProtocolError(
                        f"DATA with {len(frames) - 2} frames (a control map and a codec header at least)"
                    )
                self._on_data(identity, frames[2], frames[3], frames[4:])
                return
            if len(frames) != 3:
                raise ProtocolError(f"{kind!r:.40} control message with {len(frames) - 1} frames")
            if kind == b"attach":
                self._on_attach(identity, unpack_ctrl(frames[2].bytes, ATTACH))
            elif kind in (b"ping", b"detach"):
                ctrl = unpack_ctrl(frames[2].bytes, PING)
                holder = self._holder(identity, ctrl)
                holder.last_seen = time.monotonic()
                if kind == b"ping":
                    self._reply(identity, b"pong", session=self._session, lease=ctrl["lease"], gen=holder.gen)
                else:
                    self._release(ctrl["lease"], "detached")
            else:
                raise ProtocolError(f"unknown control message {kind!r:.40}")
        except ProtocolError as exc:
            self.stats.rejected += 1
            log.warning("%s: dropped a message: %s", self.address, exc.reason)

    def _reply(self, identity: bytes, kind: bytes, **fields: Any) -> None:
        try:
            self._sock.send_multipart([identity, kind, pack_ctrl(**fields)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the peer is gone; it will attach again if it comes back
            pass

    def _on_attach(self, identity: bytes, ctrl: dict[str, Any]) -> None:
        index = next((i for i, h in enumerate(self._leases) if h is not None and h.sender == ctrl["sender"]), None)
        if index is not None and self._leases[index].identity != identity:  # reconnected: start afresh
            self._release(index, "attached again")
            index = None
        if index is None:  # (else the same sender asks again, its first answer being slow: the same lease)
            self._expire_leases(stuck_only=False)
            index = next((i for i, h in enumerate(self._leases) if h is None), None)
            if index is None:
                self._reply(identity, b"refuse", reason=f"all {len(self._leases)} leases are held; raise max_senders")
                return
            self._free_copied(wait=True)  # our last reads of this lease are done before it is written again
            self._gens[index] += 1
            self._leases[index] = _Holder(identity, ctrl["sender"], self._gens[index], time.monotonic())
            log.info("%s: lease %d (gen %d) -> sender %s", self.address, index, self._gens[index], ctrl["sender"][:8])
        holder = self._leases[index]
        holder.last_seen = time.monotonic()
        self._reply(
            identity,
            b"lease",
            session=self._session,
            lease=index,
            gen=holder.gen,
            offset=index * self._lease_bytes,
            nbytes=self._lease_bytes,
            timeout_ms=int(self._timeout * 1000),
            export=self._region.export(),
        )

    def _holder(self, identity: bytes, ctrl: dict[str, Any]) -> _Holder:
        """The live lease a control message names; else EXPIRED to its sender and ProtocolError."""
        index = ctrl["lease"]
        holder = self._leases[index] if index < len(self._leases) else None
        if (
            ctrl["session"] != self._session
            or holder is None
            or holder.gen != ctrl["gen"]
            or holder.identity != identity
        ):
            reason = "receiver restarted" if ctrl["session"] != self._session else "lease expired or not yours"
            self._reply(identity, b"expired", session=ctrl["session"], lease=index, gen=ctrl["gen"], reason=reason)
            raise ProtocolError(f"message for lease {index} gen {ctrl['gen']}: {reason}")
        return holder

    def _on_data(self, identity: bytes, raw_ctrl: Any, raw_header: Any, inline: list) -> None:
        """Check a DATA message completely and queue it for delivery (see _deliver)."""
        ctrl = unpack_ctrl(raw_ctrl.bytes, DATA)
        holder = self._holder(identity, ctrl)
        holder.last_seen = time.monotonic()
        try:
            header = parse_header(raw_header, self._limits)
            payloads = self._payloads(header.frames, ctrl, inline)
            fence = self._write_fence(ctrl["fence"], holder, any(isinstance(p, tuple) for p in payloads))
        except BaseException:  # refused (or we failed, e.g. out of memory for an inline tensor): free the span
            self._copies.append((None, ctrl["lease"], holder.gen, ctrl["seq"]))
            raise
        self._arrived.append(_Arrival(holder, ctrl["lease"], ctrl["seq"], header, payloads, fence))

    def _payloads(self, specs: list[FrameSpec], ctrl: dict[str, Any], inline: list) -> list:
        """The message's payloads: inline frames decoded (tensors put on our GPU), region ones as
        checked (offset, dtype, shape)."""
        spans = ctrl["spans"]
        if len(spans) != len(specs):
            raise ProtocolError(f"{len(spans)} spans for {len(specs)} frames")
        if spans.count(None) != len(inline):
            raise ProtocolError(f"{len(inline)} inline frames, spans call for {spans.count(None)}")
        base = ctrl["lease"] * self._lease_bytes
        frames = iter(inline)
        payloads: list = []
        for spec, span in zip(specs, spans, strict=True):
            if span is None:
                payload = frame_payload(next(frames), spec)
                payloads.append(payload if spec.dtype == BYTES else payload.to(self._region.device))
                continue
            if spec.dtype == BYTES:
                raise ProtocolError(f"frame {spec.field!r} names a region span it may not use")
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            ):
                raise ProtocolError(f"bad span {span!r:.60}")
            offset, nbytes = span
            if nbytes != spec.nbytes or offset % ALIGN or offset < 0 or offset + nbytes > self._lease_bytes:
                raise ProtocolError(
                    f"span {span} does not fit a lease of {self._lease_bytes} bytes "
                    f"for {spec.nbytes}-byte {spec.field!r}"
                )
            payloads.append((base + offset, DTYPES[spec.dtype], spec.shape))
        return payloads

    def _write_fence(self, wire: bytes, holder: _Holder, in_region: bool) -> Any:
        """The opened write fence of a DATA with region payloads; None for one without."""
        if not in_region:
            if wire:
                raise ProtocolError("a DATA message without region spans names a write fence")
            return None
        if len(wire) != IPC_EVENT_BYTES:
            raise ProtocolError(f"write fence of {len(wire)} bytes (a CUDA IPC event handle is {IPC_EVENT_BYTES})")
        fence = holder.fences.get(wire)
        if fence is None:
            if len(holder.fences) >= MAX_FENCES:
                raise ProtocolError(f"the sender named more than {MAX_FENCES} write fences")
            try:
                fence = self._region.open_fence(wire)
            except RuntimeError as exc:
                raise ProtocolError(f"cannot open the sender's write fence: {exc}") from None
            holder.fences[wire] = fence
        return fence

    # -- leases

    def _forgive_own_absence(self) -> None:
        """If the consumer did not call recv() for a while, the senders' pings are waiting in the
        socket, not missing: restart their silence clocks instead of reclaiming their leases."""
        now = time.monotonic()
        if now - self._last_active > self._timeout / 2:
            for holder in self._leases:
                if holder is not None:
                    holder.last_seen = max(holder.last_seen, now)

    def _expire_leases(self, stuck_only: bool) -> None:
        """Reclaim the leases of senders silent for lease_timeout. `stuck_only`: only those with
        a message waiting for a write fence (a sender that died before its copy ran); the others
        are reclaimed when a new sender needs a lease, so an idle sender keeps its own."""
        now = time.monotonic()
        stuck = {a.index for a in self._arrived} if stuck_only else None
        for index, holder in enumerate(self._leases):
            if holder is not None and now - holder.last_seen > self._timeout and (stuck is None or index in stuck):
                self._release(index, f"silent for {now - holder.last_seen:.1f}s")

    def _release(self, index: int, why: str) -> None:
        holder = self._leases[index]
        if holder is None:
            return
        # Its messages whose data has landed are copied out now, before the lease can be granted
        # again and written over (a DETACH right behind the last DATA, say); the others never will.
        mine = [a for a in self._arrived if a.holder is holder]
        for arrival in mine:
            self._arrived.remove(arrival)  # by identity (eq=False)
        while mine and _landed(mine[0]):
            self._copy_out(mine.pop(0))
        if mine:
            log.warning(
                "%s: dropped %d message(s) of lease %d: the lease was reclaimed before its writes landed",
                self.address,
                len(mine),
                index,
            )
        log.info(
            "%s: lease %d (gen %d) of sender %s released: %s", self.address, index, holder.gen, holder.sender[:8], why
        )
        self._leases[index] = None


def _landed(arrival: _Arrival) -> bool:
    """Whether the DATA's data is in the region. The event of a sender that has gone reads as not
    done or raises: its message waits, and is dropped with the lease."""
    if arrival.fence is None:
        return True
    try:
        return arrival.fence.query()
    except RuntimeError:
        return False
