"""The language service's side of the encoders: its cuda_ipc result receiver's region has one
lease per encoder plus one, each of `result_lease_mib`."""

from __future__ import annotations

import logging

import pytest
import torch

from language_server.engine import encoder_client
from language_server.engine.encoder_client import EncoderClient
from tests.net import free_tcp_address
from tests.region_hooks import HostIpcReceiver, HostIpcSender, deliver
from transfer.base import TransportTimeout
from transfer.messages import EncodeResult


def test_region_results_get_a_lease_per_encoder_plus_one_of_the_set_size(caplog, monkeypatch) -> None:
    """The receiver the client builds for cuda_ipc results, with its GPU memory stood in for by
    host memory (tests/region_hooks.py), so the options it is given are checked on any machine."""

    def receiver(name, address, **options):
        assert name == "cuda_ipc" and options["device"] == "cuda:1"
        return HostIpcReceiver(address, **options)

    monkeypatch.setattr(encoder_client, "make_receiver", receiver)
    client = EncoderClient(
        ["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"],
        "zmq",
        free_tcp_address(),
        30.0,
        1,
        2.0,
        result_transport="cuda_ipc",
        device="cuda:1",
        result_lease_mib=1,
    )
    senders: list[HostIpcSender] = []
    try:
        for i in range(3):  # two encoders and a restarted one
            senders.append(HostIpcSender(client.result_address))
            deliver(client.receiver, senders[i], EncodeResult(f"fits-{i}", "k", (1, 1, 1), torch.ones(512, 256)))
        assert not any("exceeds" in r.getMessage() for r in caplog.records)
        with caplog.at_level(logging.WARNING):
            deliver(client.receiver, senders[0], EncodeResult("big", "k", (1, 1, 1), torch.ones(1536, 256)))
        assert any("exceeds the 1048576-byte lease" in r.getMessage() for r in caplog.records)  # 1.5 MiB > 1 MiB
        senders.append(HostIpcSender(client.result_address))
        reasons = set()
        for _ in range(10):
            client.receiver.recv(timeout=0.05)
            with pytest.raises(TransportTimeout) as info:
                senders[3].send(EncodeResult("extra", "k", (1, 1, 1), torch.ones(4, 4)), timeout=0.05)
            reasons.add(str(info.value))
        assert any("all 3 leases are held" in r for r in reasons), reasons
    finally:
        for sender in senders:
            sender.close()
        client.close()


def test_jobs_sent_to_an_encoder_that_restarted_are_sent_again_at_once() -> None:
    """A supervisor restarts an encoder at the same address faster than pings miss it: the first
    pong of the new instance (a new service_id) sends the jobs the old one took again, instead of
    leaving them to wait out encode_timeout_s."""
    from transfer.messages import EncodeJob, HealthPing, HealthPong
    from transfer.registry import make_receiver, make_sender

    encoder_address = free_tcp_address()
    jobs_in = make_receiver("zmq", encoder_address)
    client = EncoderClient([encoder_address], "zmq", free_tcp_address(), 30.0, 1, 0.2)
    pong_out = make_sender("zmq", client.result_address)

    def next_message(kind: type) -> object:
        for _ in range(100):
            client.poll()
            msg = jobs_in.recv(timeout=0.05)
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"no {kind.__name__} reached the encoder")

    def answer(ping: HealthPing, service_id: str) -> None:
        pong_out.send(
            HealthPong(seq=ping.seq, sent_at=ping.sent_at, service_id=service_id, queued=0, running=0, ready=True),
            timeout=1,
        )

    try:
        answer(next_message(HealthPing), "host:100")
        client.poll()
        assert client.submit("req-1", 0, "key-1", "data:image/png;base64,AAAA", {}) is None
        first = next_message(EncodeJob)
        # The instance that took the job dies without answering; its successor answers the pings.
        answer(next_message(HealthPing), "host:200")
        again = next_message(EncodeJob)
        assert again.image_key == first.image_key and again.request_id != first.request_id
        pong_out.send(EncodeResult(again.request_id, again.image_key, (1, 2, 2), torch.ones(1, 8)), timeout=1)
        for _ in range(50):
            outcomes = client.poll()
            if outcomes:
                break
            jobs_in.recv(timeout=0.02)
        assert [(o.request_id, o.error_code) for o in outcomes] == [("req-1", None)]
    finally:
        pong_out.close()
        jobs_in.close()
        client.close()
