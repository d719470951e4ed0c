"""The encode service's outboxes: answers leave one thread per reply address."""

from __future__ import annotations

import time

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
