"""The default transport: zmq PUSH -> PULL over tcp:// (across nodes) or ipc:// (one node).

Why these choices:
- PUSH/PULL: results and jobs flow one way; replies go to the `reply_to` address in the
  message, where the other side runs its own receiver. Many senders may share one receiver.
- Small high-water marks on both ends bound the messages in flight (about sndhwm + rcvhwm,
  plus what the kernel's socket buffers hold), so a stalled receiver makes send() block and
  then raise TransportTimeout instead of letting the sender's memory grow. Frames are the
  caller's own tensor memory (zero-copy), so this bound is also the memory bound.
- IMMEDIATE: while the receiver is down nothing is queued for it; send() pushes back at once,
  so a caller can fail over instead of filling a queue for a peer that may never return.
- zmq reconnects by itself, and ZMTP heartbeats drop a connection whose peer vanished without
  closing it (see HEARTBEAT_TIMEOUT_MS), so a restarted peer is picked up and no socket hangs on
  a dead one. A half-sent message of a dying peer is discarded by zmq, never delivered in part.
- MAXMSGSIZE makes zmq drop (and disconnect) any frame larger than the codec's limits.
"""

from __future__ import annotations

import logging
import time

import zmq

from transfer.base import Receiver, ReceiverStats, Sender, TransportError, TransportTimeout
from transfer.codec import DEFAULT_LIMITS, Limits, ProtocolError, decode_message, encode_message
from transfer.messages import Message

log = logging.getLogger(__name__)

# ZMTP heartbeats find peers that vanished without closing the connection (a host gone, a
# partition). The timeout is long on purpose: a receiver that is alive but not reading (the
# backpressure case) stops reading its socket, so it sees no PONG either, and a short timeout
# would drop its connection and the messages in flight (measured: an 8 s stall lost 4 of 30
# messages with a 5 s timeout). A process that dies closes its sockets and is noticed at once.
HEARTBEAT_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 60_000


def common_options(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)  # close() never blocks on a dead peer
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


def check_address(address: str) -> None:
    if not address.startswith(("tcp://", "ipc://", "inproc://")):
        raise TransportError(f"zmq address {address!r} must start with tcp://, ipc:// or inproc://")


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def remaining_ms(deadline: float | None) -> int | None:
    return None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))


class ZmqSender(Sender):
    def __init__(self, address: str, *, sndhwm: int = 4, context: zmq.Context | None = None):
        check_address(address)
        self.address = address
        self._sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
        common_options(self._sock)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.connect(address)

    def send(self, msg: Message, timeout: float | None = None) -> None:
        frames = encode_message(msg)  # raises ProtocolError for a message we must not send
        deadline = deadline_after(timeout)
        while True:
            if self._sock.poll(remaining_ms(deadline), zmq.POLLOUT):
                try:
                    # All frames of a multipart message are accepted or none: once the first
                    # goes in, zmq takes the rest regardless of the high-water mark.
                    self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    return
                except zmq.Again:  # lost a race for the last slot; wait again
                    pass
            if deadline is not None and time.monotonic() >= deadline:
                raise TransportTimeout(
                    f"could not send {type(msg).__name__} to {self.address} within {timeout}s: "
                    "the receiver is not consuming (stalled, slow or not running)"
                )

    def close(self) -> None:
        self._sock.close(linger=0)


class ZmqReceiver(Receiver):
    def __init__(
        self,
        address: str,
        *,
        rcvhwm: int = 4,
        limits: Limits = DEFAULT_LIMITS,
        context: zmq.Context | None = None,
    ):
        check_address(address)
        self._limits = limits
        self._sock = (context or zmq.Context.instance()).socket(zmq.PULL)
        common_options(self._sock)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_frame_bytes, limits.max_header_bytes))
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise TransportError(f"cannot bind {address}: {exc} (is another receiver running there?)") from exc
        # tcp://host:* or :0 binds a free port; report the one chosen.
        self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stats = ReceiverStats()

    def recv(self, timeout: float | None = None) -> Message | None:
        deadline = deadline_after(timeout)
        while True:
            if not self._sock.poll(remaining_ms(deadline), zmq.POLLIN):
                if deadline is None or time.monotonic() >= deadline:
                    return None
                continue
            frames = self._sock.recv_multipart(copy=False)
            try:
                msg = decode_message(frames, self._limits)
            except ProtocolError as exc:
                self.stats.rejected += 1
                log.warning("%s: dropped a message: %s", self.address, exc.reason)
                continue
            self.stats.received += 1
            return msg

    def close(self) -> None:
        self._sock.close(linger=0)
