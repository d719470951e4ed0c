"""The sending end of `cuda_ipc`: asks the receiver for a lease, copies each message's tensors
device to device into a span of it, records the write fence and sends the DATA naming both.
transfer/leases.py describes the protocol and its safety rules. The region's handle is opened
with `UntypedStorage._new_shared_cuda(...)` (as torch.multiprocessing does, without pickle). The
receiver's GPU must be visible to this process (CUDA_VISIBLE_DEVICES); it is found by UUID, as
device indexes differ between processes that see different GPU sets.

send() runs the protocol, on its caller's thread alone (like a zmq socket, not thread-safe).
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from transfer.base import Sender, TransportError, TransportTimeout
from transfer.codec import DEFAULT_LIMITS, Limits, ProtocolError, host_buffer, pack_header, split_message
from transfer.leases import (
    EXPIRED,
    FREE,
    LEASE,
    MAX_EVENTS,
    PING,
    REFUSE,
    Ring,
    align,
    lease_key,
    pack_ctrl,
    unpack_ctrl,
)
from transfer.messages import Message
from transfer.zmq_transport import check_address, common_options, deadline_after, remaining_ms

log = logging.getLogger(__name__)

ATTACH_RETRY_S = 0.5  # a sender without a lease, or waiting for a PONG, asks again this often


def device_with_uuid(uuid: str) -> int:
    seen = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    if uuid not in seen:
        raise TransportError(
            f"the receiver's GPU {uuid} is not visible to this process (it sees {seen}); make both "
            "GPUs visible to the sender, e.g. CUDA_VISIBLE_DEVICES=0,1, and pick its own GPU with "
            "torch.cuda.set_device"
        )
    return seen.index(uuid)


class GpuWriter:
    """A sender's mapping of the receiver's region, and the write fences of its copies.

    The region is mapped on the GPU the payloads live on (that of the first write) where it has
    peer access to the owner, not on the GPU that owns it. Writes are then plain device-to-device
    copies that the sender's copy engine pushes over NVLink / PCIe peer-to-peer. Mapped on the
    owning GPU (what torch.multiprocessing does), the same copy goes between devices into memory
    the source GPU has no peer mapping of, which the driver stages through host memory.
    """

    def __init__(self, export: dict[str, Any]):
        torch.cuda.init()  # as torch.multiprocessing does before rebuilding a shared CUDA storage
        try:
            self._owner = device_with_uuid(export["uuid"])
            self._args = (
                export["handle"],
                export["size"],
                export["offset"],
                export["ref_counter"],
                export["ref_counter_offset"],
                export["event_handle"],
                export["event_sync"],
            )
        except (KeyError, TypeError) as exc:
            raise TransportError(f"bad CUDA IPC export from the receiver: {exc!r}") from exc
        self._region: torch.Tensor | None = None
        self.device: torch.device | None = None
        # (event, its handle, the source tensors of its copies), oldest record first
        self._events: collections.deque[tuple[torch.cuda.Event, bytes, tuple]] = collections.deque()

    def _map(self, near: int) -> None:
        peer = near != self._owner and torch.cuda.can_device_access_peer(near, self._owner)
        index = near if peer else self._owner
        try:
            storage = torch.UntypedStorage._new_shared_cuda(index, *self._args)
        except (TypeError, RuntimeError) as exc:
            raise TransportError(f"cannot open the receiver's CUDA IPC region on GPU {index}: {exc}") from exc
        self.device = torch.device("cuda", index)
        self._region = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)

    def write(self, offset: int, src: torch.Tensor) -> None:
        """Start copying the contiguous uint8 tensor `src` to region offset `offset`, on the
        current stream."""
        if self._region is None:  # once per lease
            self._map(src.device.index if src.is_cuda else torch.cuda.current_device())
        self._region[offset : offset + src.numel()].copy_(src, non_blocking=True)

    def fence(self, keep: tuple) -> bytes:
        """Record the write fence behind the copies issued so far; its handle, for the DATA.
        `keep` (the copies' sources) stays alive until the fence completes."""
        event, wire = self._idle_event()
        event.record(torch.cuda.current_stream(self.device))
        self._events.append((event, wire, keep))
        return wire

    def _idle_event(self) -> tuple[torch.cuda.Event, bytes]:
        """An interprocess event whose last record has completed. Re-recording one that has not
        would let the receiver's query for the earlier DATA see the new record instead: safe on
        one stream (copies complete in order), wrong if the caller switched streams between
        sends. So the oldest is reused only once done; else a new one, up to MAX_EVENTS; else
        the oldest is waited for (the receiver is that far behind anyway)."""
        if self._events and self._events[0][0].query():
            event, wire, _ = self._events.popleft()
            return event, wire
        if len(self._events) < MAX_EVENTS:
            with torch.cuda.device(self.device):  # an event's handle is made on the current device
                event = torch.cuda.Event(interprocess=True)
                return event, event.ipc_handle()
        event, wire, _ = self._events.popleft()
        event.synchronize()
        return event, wire

    def close(self) -> None:
        if self._events:  # the copies still read their sources, which may go with the events
            self._events[-1][0].synchronize()
            self._events.clear()
        self._region = None  # torch syncs, drops its reference count and closes the handle


@dataclass
class _Lease:
    key: tuple[int, int, int]  # (session, lease, gen)
    offset: int  # of the lease in the region
    nbytes: int
    timeout: float  # the receiver's lease timeout, in seconds
    writer: Any
    ring: Ring


class CudaIpcSender(Sender):
    """Sends messages through a receiver's region. Send from one GPU: the region is mapped on
    the GPU of the first tensor sent through each lease."""

    writer_type: type = GpuWriter

    def __init__(self, address: str, *, limits: Limits = DEFAULT_LIMITS, context: zmq.Context | None = None):
        check_address(address)
        self.address = address
        self._limits = limits
        self._id = uuid.uuid4().hex
        self._lease: _Lease | None = None
        self._contact = 0.0  # when the receiver last answered an ATTACH or PING of ours
        self._next_ask = 0.0  # when to send the next ATTACH or PING
        self._refused = ""  # the receiver's last reason for not granting a lease
        self._seq = 0
        self._warned_inline = False
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        common_options(self._sock)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a receiver that is not there
        self._sock.connect(address)

    def send(self, msg: Message, timeout: float | None = None) -> None:
        header, payloads = split_message(msg, self._limits)
        deadline = deadline_after(timeout)
        direct = [i for i, (spec, p) in enumerate(payloads) if isinstance(p, torch.Tensor) and spec.nbytes > 0]
        total = sum(align(payloads[i][0].nbytes) for i in direct)
        lease, seq, start = self._reserve(total, deadline)
        spans: list[list[int] | None] = [None] * len(payloads)
        fence = b""
        if seq:
            try:
                at = start
                for i in direct:
                    spec, tensor = payloads[i]
                    lease.writer.write(lease.offset + at, tensor.reshape(-1).view(torch.uint8))
                    spans[i] = [at, spec.nbytes]
                    at += align(spec.nbytes)
                fence = lease.writer.fence(tuple(payloads[i][1] for i in direct))
            except BaseException:
                lease.ring.free(seq)  # nothing will be sent for this span
                raise
        session, index, gen = lease.key
        ctrl = pack_ctrl(session=session, lease=index, gen=gen, seq=seq, spans=spans, fence=fence)
        inline = [host_buffer(p) for (_, p), span in zip(payloads, spans, strict=True) if span is None]
        try:
            self._send([b"data", ctrl, pack_header(header), *inline], deadline, "the receiver is not reading")
        except TransportTimeout:
            lease.ring.free(seq)
            raise

    def close(self) -> None:
        if self._lease is not None:
            session, index, gen = self._lease.key
            self._try_send([b"detach", pack_ctrl(session=session, lease=index, gen=gen)])
            self._drop_lease()
        self._sock.close(linger=100)

    def _reserve(self, nbytes: int, deadline: float | None) -> tuple[_Lease, int, int]:
        """A lease the receiver vouched for lately, and a span of `nbytes` in it: (lease, seq,
        start); seq 0 when the message goes inline (no tensor bytes, or more than a lease)."""
        while True:
            self._read_control()
            lease, now = self._lease, time.monotonic()
            if lease is None:
                why = f"no lease from the receiver{f' ({self._refused})' if self._refused else ''}"
                self._ask(now, [b"attach", pack_ctrl(sender=self._id)])
            else:
                if now - self._contact > lease.timeout / 4:  # ask early, so a streaming sender rarely waits
                    session, index, gen = lease.key
                    self._ask(now, [b"ping", pack_ctrl(session=session, lease=index, gen=gen)])
                why = "the receiver does not answer"
                if now - self._contact <= lease.timeout / 2:  # it cannot have reclaimed the lease yet
                    if nbytes > lease.nbytes and not self._warned_inline:
                        log.warning(
                            "%s: a %d-byte message exceeds the %d-byte lease; sending it inline through host "
                            "memory (raise lease_bytes on the receiver)",
                            self.address,
                            nbytes,
                            lease.nbytes,
                        )
                        self._warned_inline = True
                    if nbytes == 0 or nbytes > lease.nbytes:
                        return lease, 0, 0
                    start = lease.ring.alloc(self._seq + 1, nbytes)
                    if start is not None:
                        self._seq += 1
                        return lease, self._seq, start
                    why = "the receiver's region is full (it is not freeing spans)"
            left = remaining_ms(deadline)
            if left == 0:
                raise TransportTimeout(f"{self.address}: {why}")
            self._sock.poll(100 if left is None else min(100, left), zmq.POLLIN)

    def _ask(self, now: float, frames: list) -> None:
        """Send an ATTACH or PING, at most once per ATTACH_RETRY_S."""
        if now >= self._next_ask and self._try_send(frames):
            self._next_ask = now + ATTACH_RETRY_S

    def _send(self, frames: list, deadline: float | None, why: str) -> None:
        while not self._try_send(frames):
            left = remaining_ms(deadline)
            if left == 0:
                raise TransportTimeout(f"{self.address}: {why}")
            self._sock.poll(left, zmq.POLLOUT)

    def _try_send(self, frames: list) -> bool:
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _read_control(self) -> None:
        while self._sock.poll(0, zmq.POLLIN):
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
            try:
                self._on_control(frames)
            except ProtocolError as exc:
                log.warning("%s: ignored a control message: %s", self.address, exc.reason)

    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            raise ProtocolError(f"control message with {len(frames)} frames")
        kind, body = frames
        current = self._lease.key if self._lease is not None else None
        if kind == b"lease":
            ctrl = unpack_ctrl(body, LEASE)
            if lease_key(ctrl) != current:
                self._drop_lease()
                writer = self.writer_type(ctrl["export"])  # TransportError (e.g. GPU not visible) reaches send()
                self._lease = _Lease(
                    lease_key(ctrl),
                    ctrl["offset"],
                    ctrl["nbytes"],
                    ctrl["timeout_ms"] / 1000,
                    writer,
                    Ring(ctrl["nbytes"]),
                )
            self._contact, self._refused, self._next_ask = time.monotonic(), "", 0.0
        elif kind == b"pong":
            if lease_key(unpack_ctrl(body, PING)) == current:
                self._contact, self._next_ask = time.monotonic(), 0.0
        elif kind == b"free":
            ctrl = unpack_ctrl(body, FREE)
            if lease_key(ctrl) == current:
                self._lease.ring.free(ctrl["seq"])
        elif kind == b"expired":
            ctrl = unpack_ctrl(body, EXPIRED)
            if lease_key(ctrl) == current:
                log.warning("%s: lease expired (%s); attaching again", self.address, ctrl["reason"])
                self._drop_lease()
        elif kind == b"refuse":
            reason = unpack_ctrl(body, REFUSE)["reason"]
            if reason != self._refused:
                log.warning("%s: attach refused: %s", self.address, reason)
            self._refused = reason
        else:
            raise ProtocolError(f"unknown control message {kind!r:.40}")

    def _drop_lease(self) -> None:
        if self._lease is not None:
            self._lease.writer.close()
            self._lease, self._next_ask = None, 0.0
