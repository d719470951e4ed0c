"""The encode service's outboxes: answers leave one thread per reply address."""

from __future__ import annotations

import threading
import time

from encode_server import outbox
from encode_server.metrics import EncodeMetrics
from encode_server.outbox import _Outbox
from tests.net import free_tcp_address
from transfer.messages import HealthPong


def test_a_pong_to_a_vanished_peer_gives_up_within_a_second():
    """Nobody listens at the reply address: a result would wait send_timeout_s (here 20 s) for
    its peer, a health pong only ~1 s, so it cannot hold up what is queued behind it or a
    shutdown."""
    metrics = EncodeMetrics(lambda: 0.0, lambda: 0.0, lambda: 0.0)
    box = _Outbox("zmq", free_tcp_address(), send_timeout_s=20.0, metrics=metrics)
    started = time.monotonic()
    box.post(HealthPong(1, 0.0, "encoder", 0, 0, True))
    box.stop()
    box.thread.join(10)
    assert not box.thread.is_alive(), "the pong waited for the peer as long as a result would"
    assert time.monotonic() - started < 5
    assert metrics.registry.get_sample_value("splitvl_encode_send_failures_total") == 1


def test_queued_results_leave_together_in_order_and_pongs_alone(monkeypatch):
    """Results queued while the outbox thread was busy go out through one send_many, in order;
    a pong between them goes on its own."""
    import torch

    from transfer.messages import EncodeResult
    from transfer.registry import make_receiver, make_sender

    with make_receiver("zmq", "tcp://127.0.0.1:*") as receiver:
        metrics = EncodeMetrics(lambda: 0.0, lambda: 0.0, lambda: 0.0)
        queued = threading.Event()  # the outbox thread opens its sender only once all is queued
        calls: list[tuple[str, int]] = []  # (sender method, messages in the call)

        class Recording:  # a real zmq sender that notes the outbox's calls
            def __init__(self, sender) -> None:
                self.sender = sender

            def send(self, msg, timeout=None) -> None:
                calls.append(("send", 1))
                self.sender.send(msg, timeout)

            def send_many(self, msgs, timeout=None) -> None:
                calls.append(("send_many", len(msgs)))
                self.sender.send_many(msgs, timeout)

            def close(self) -> None:
                self.sender.close()

        def make_sender_later(*args, **kwargs):
            queued.wait(10)
            return Recording(make_sender(*args, **kwargs))

        monkeypatch.setattr(outbox, "make_sender", make_sender_later)
        box = _Outbox("zmq", receiver.address, send_timeout_s=20.0, metrics=metrics)
        results = [EncodeResult(f"r-{i}", "k", (1, 1, 1), torch.full((4, 8), float(i))) for i in range(6)]
        sent = [*results[:3], HealthPong(1, 0.0, "encoder", 0, 0, True), *results[3:]]
        for msg in sent:  # queued together: the thread takes them as one batch
            box.queue.put(msg)
        box.stop()
        queued.set()
        got = [receiver.recv(timeout=20) for _ in sent]
        box.thread.join(10)
    assert [type(m).__name__ for m in got] == [type(m).__name__ for m in sent]
    assert [m.request_id for m in got if isinstance(m, EncodeResult)] == [m.request_id for m in results]
    assert all(torch.equal(a.embeddings, b.embeddings) for a, b in zip(got[:3] + got[4:], results, strict=True))
    assert calls == [("send_many", 3), ("send", 1), ("send_many", 3)], calls
    assert metrics.registry.get_sample_value("splitvl_encode_send_failures_total") == 0
