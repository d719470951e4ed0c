"""nixl transport: a clear error without the package; where NIXL imports, a real two-process
round trip with UCX forced onto TCP loopback."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import sys
import time

import pytest
import torch

from transfer.base import TransportError
from transfer.messages import EncodeError, EncodeResult
from transfer.registry import make_receiver, make_sender

# Peers start from a clean forkserver (nothing inherited from pytest) that has torch imported
# already, so each one costs ~0.1 s instead of a fresh interpreter's ~1.5 s.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "zmq", "msgpack", "transfer.region", "transfer.zmq_transport"])
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
HAVE_NIXL = importlib.util.find_spec("nixl") is not None


def stream(n: int) -> list:
    out: list = []
    for i in range(n):
        dtype = list(BITS)[i % 3]
        g = torch.Generator().manual_seed(i)
        info = torch.iinfo(BITS[dtype])
        rows = [1, 64, 200, 0][i % 4]
        out.append(EncodeResult(f"m-{i}", "key", (1, 1, 1),
                                torch.randint(info.min, info.max, (rows, 512), generator=g, dtype=BITS[dtype]).view(dtype)))
    out.append(EncodeError("err", "key", "bad_image", "broken"))
    return out


def _send_stream(address: str, n: int) -> None:
    with make_sender("nixl", address) as sender:
        for msg in stream(n):
            sender.send(msg, timeout=60)
        time.sleep(0.5)


def test_missing_nixl_is_a_clear_error(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "nixl" or m.startswith("nixl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nixl", None)  # makes `import nixl...` raise ImportError
    with pytest.raises(TransportError, match="pip install nixl"):
        make_sender("nixl", "tcp://127.0.0.1:1")
    with pytest.raises(TransportError, match="pip install nixl"):
        make_receiver("nixl", "tcp://127.0.0.1:*")


@pytest.mark.skipif(not HAVE_NIXL, reason="NIXL is not installed (pip install nixl)")
def test_nixl_round_trip_over_tcp_loopback(monkeypatch) -> None:
    # UCX picks shared memory between processes of one host; force TCP so this is the path
    # two nodes without RDMA would take. Children inherit the environment.
    monkeypatch.setenv("UCX_TLS", "tcp")
    n = 24  # ~4 MiB through a 256 KiB lease: spans are recycled
    with make_receiver("nixl", "tcp://127.0.0.1:*", lease_bytes=256 << 10, max_senders=1) as receiver:
        proc = SPAWN.Process(target=_send_stream, args=(receiver.address, n), daemon=True)
        proc.start()
        got = [receiver.recv(timeout=60) for _ in range(n + 1)]
        proc.join(10)
        assert receiver.stats.rejected == 0
    for want, have in zip(stream(n), got):
        assert have is not None, f"{want.request_id} never arrived"
        if isinstance(want, EncodeResult):
            assert have.request_id == want.request_id and have.embeddings.dtype == want.embeddings.dtype
            assert torch.equal(have.embeddings.view(BITS[want.embeddings.dtype]), want.embeddings.view(BITS[want.embeddings.dtype]))
        else:
            assert have == want
