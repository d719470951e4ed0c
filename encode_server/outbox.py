"""Answers to their reply addresses: one sender and one thread per address.

A thread per address keeps a stalled language service from delaying answers to the others
(each send may block up to send_timeout_s under backpressure), and gives every transport
socket a single owning thread. Senders are cached; one idle for a while is closed when a new
address shows up, so language services that restart on fresh addresses do not leak sockets.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from encode_server.metrics import EncodeMetrics
from transfer.base import Sender, TransportError
from transfer.messages import EncodeResult, HealthPong, Message
from transfer.registry import make_sender

log = logging.getLogger(__name__)

# The transfer interface has no flush: a sender's close() drops what the transport still
# buffers. Before closing, an outbox that sent recently waits this long for it to leave.
_FLUSH_S = 0.5
_IDLE_CLOSE_S = 300.0
_PONG_TIMEOUT_S = 1.0
_MAX_BATCH = 16  # results sent together at most
_STOP = object()


class _Outbox:
    def __init__(self, transport: str, address: str, send_timeout_s: float, metrics: EncodeMetrics) -> None:
        self.transport, self.address = transport, address
        self.send_timeout_s = send_timeout_s
        self.metrics = metrics
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.last_used = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"outbox {address}", daemon=True)
        self.thread.start()

    def post(self, msg: Message) -> None:
        self.last_used = time.monotonic()
        self.queue.put(msg)

    def stop(self) -> None:
        self.queue.put(_STOP)

    def _run(self) -> None:
        try:
            sender: Sender | None = make_sender(self.transport, self.address)
        except Exception as exc:  # backends raise their own types for a bad address
            log.error("cannot open a sender to reply address %s: %s; its answers are dropped", self.address, exc)
            sender = None
        last_sent = 0.0
        stopping = False
        while not stopping and (msg := self.queue.get()) is not _STOP:
            # Everything queued behind it goes too, in order, before the next wait on the queue.
            waiting = [msg]
            while len(waiting) < _MAX_BATCH:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                waiting.append(more)
            if sender is None:
                self.metrics.send_failures.inc(len(waiting))
                continue
            for group in _runs(waiting):
                if self._send(sender, group):
                    last_sent = time.monotonic()
        if sender is not None:
            time.sleep(max(0.0, last_sent + _FLUSH_S - time.monotonic()))
            sender.close()

    def _send(self, sender: Sender, group: list[Message]) -> bool:
        """Send a pong alone, or a run of other messages together; False if it was dropped."""
        # A pong is only worth its freshness: waiting long for a stalled or vanished peer
        # would hold up the results queued behind it (and a shutdown) for nothing.
        pong = isinstance(group[0], HealthPong)
        try:
            if pong:
                sender.send(group[0], timeout=min(self.send_timeout_s, _PONG_TIMEOUT_S))
            else:
                sender.send_many(group, timeout=self.send_timeout_s)
        except TransportError as exc:  # TransportTimeout included: the peer is stalled or gone
            # send_many may have sent the first few; counted as dropped all the same (the
            # language service times out and retries whatever did not arrive).
            log.warning("dropped %d message(s) (%s) for %s: %s", len(group), type(group[0]).__name__, self.address, exc)
            self.metrics.send_failures.inc(len(group))
            return False
        for msg in group:
            if isinstance(msg, EncodeResult):
                self.metrics.bytes_sent.inc(msg.embeddings.numel() * msg.embeddings.element_size())
        return True


def _runs(msgs: list[Message]) -> list[list[Message]]:
    """Split into pongs (alone) and runs of the other messages between them, in order."""
    runs: list[list[Message]] = []
    for msg in msgs:
        if isinstance(msg, HealthPong) or not runs or isinstance(runs[-1][0], HealthPong):
            runs.append([msg])
        else:
            runs[-1].append(msg)
    return runs


class Outboxes:
    def __init__(self, transport: str, send_timeout_s: float, metrics: EncodeMetrics) -> None:
        self.transport = transport
        self.send_timeout_s = send_timeout_s
        self.metrics = metrics
        self._boxes: dict[str, _Outbox] = {}
        self._lock = threading.Lock()
        self._closed = False

    def post(self, address: str, msg: Message) -> None:
        with self._lock:
            if self._closed:  # only when shutdown ran past its deadline with work left
                log.warning("dropped %s for %s: the service is shutting down", type(msg).__name__, address)
                self.metrics.send_failures.inc()
                return
            box = self._boxes.get(address)
            if box is None:
                self._close_idle()
                box = self._boxes[address] = _Outbox(self.transport, address, self.send_timeout_s, self.metrics)
            box.post(msg)

    def addresses(self) -> list[str]:
        """The reply addresses with an open outbox (a connection) right now."""
        with self._lock:
            return list(self._boxes)

    def close(self, timeout: float) -> None:
        """Send everything posted so far (each send still bounded by send_timeout_s), then close."""
        with self._lock:
            self._closed = True
            boxes = list(self._boxes.values())
            self._boxes.clear()
        for box in boxes:
            box.stop()
        deadline = time.monotonic() + timeout
        for box in boxes:
            box.thread.join(max(0.0, deadline - time.monotonic()))

    def _close_idle(self) -> None:
        now = time.monotonic()
        for address, box in list(self._boxes.items()):
            if now - box.last_used > _IDLE_CLOSE_S and box.queue.empty():
                box.stop()
                del self._boxes[address]
