"""The language service's side of the encoders: its result receiver's region (cuda_ipc, shm)
has one lease per encoder plus one, each of `result_lease_mib`."""

from __future__ import annotations

import logging

import pytest
import torch

from language_server.engine.encoder_client import EncoderClient
from tests.net import free_tcp_address
from tests.region_hooks import deliver
from transfer.base import TransportTimeout
from transfer.messages import EncodeResult
from transfer.shm import ShmSender


def test_region_results_get_a_lease_per_encoder_plus_one_of_the_set_size(caplog) -> None:
    client = EncoderClient(["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"], "zmq", free_tcp_address(), 30.0, 1, 2.0,
                           result_transport="shm", result_lease_mib=1)
    senders: list[ShmSender] = []
    try:
        for i in range(3):  # two encoders and a restarted one
            senders.append(ShmSender(client.result_address))
            deliver(client.receiver, senders[i], EncodeResult(f"fits-{i}", "k", (1, 1, 1), torch.ones(512, 256)))
        assert not any("exceeds" in r.getMessage() for r in caplog.records)
        with caplog.at_level(logging.WARNING):
            deliver(client.receiver, senders[0], EncodeResult("big", "k", (1, 1, 1), torch.ones(1536, 256)))
        assert any("exceeds the 1048576-byte lease" in r.getMessage() for r in caplog.records)  # 1.5 MiB > 1 MiB
        senders.append(ShmSender(client.result_address))
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
