"""Host stand-ins for cuda_ipc's GPU memory, so its lease protocol (real sockets, real sender
and receiver, real processes) runs where no GPU is; and helpers to drive it by hand.

Only the memory is stood in for: a shared file in /dev/shm instead of a GPU allocation and its
IPC handle, synchronous host copies instead of device copies, and write fences that are done
at once unless a test holds them (HeldFences). tests/test_transfer_cuda_ipc.py runs the real
GPU memory on machines with two GPUs.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any

import msgpack
import torch
import zmq

from transfer.base import TransportTimeout
from transfer.cuda_ipc_receiver import CudaIpcReceiver
from transfer.cuda_ipc_sender import CudaIpcSender
from transfer.leases import IPC_EVENT_BYTES
from transfer.messages import PROTOCOL_VERSION


class _Done:
    """A fence or copy that has completed (host copies are synchronous)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class HeldFences:
    """Write fences a test controls: not done until `done` is set (a copy still queued)."""

    done = True

    def query(self) -> bool:
        return HeldFences.done


class HostRegion:
    """The receiver's region in a shared file instead of GPU memory."""

    def __init__(self, nbytes: int, device: Any = None):
        self.device = torch.device("cpu")
        self.path = f"/dev/shm/splitvl-test-{uuid.uuid4().hex}"
        self._buf = torch.from_file(self.path, shared=True, size=nbytes, dtype=torch.uint8)

    def export(self) -> dict[str, Any]:
        return {"path": self.path, "size": self._buf.numel()}

    def open_fence(self, wire: bytes) -> HeldFences:
        return HeldFences()

    def copy_out(self, spans: list) -> tuple[list[torch.Tensor], _Done]:
        outs = [
            self._buf[o : o + dtype.itemsize * math.prod(shape)].view(dtype).view(shape).clone()
            for o, dtype, shape in spans
        ]
        return outs, _Done()

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class HostWriter:
    """The sender's mapping of a HostRegion."""

    def __init__(self, export: dict[str, Any]):
        self._buf = torch.from_file(export["path"], shared=True, size=export["size"], dtype=torch.uint8)

    def write(self, offset: int, src: torch.Tensor) -> None:
        self._buf[offset : offset + src.numel()].copy_(src)

    def fence(self, keep: tuple) -> bytes:
        return bytes(IPC_EVENT_BYTES)

    def close(self) -> None:
        self._buf = None


class HostIpcReceiver(CudaIpcReceiver):
    region_type = HostRegion


class HostIpcSender(CudaIpcSender):
    writer_type = HostWriter


def deliver(receiver, sender, msg):
    """Send `msg` from `sender` and receive it at `receiver`, both in this thread: the receiver
    runs the lease protocol only inside recv(), so a first send waits for a lease that only a
    recv() between tries can grant. Returns what arrived."""
    for _ in range(100):
        try:
            sender.send(msg, timeout=0.05)
        except TransportTimeout:
            receiver.recv(timeout=0.05)
            continue
        got = receiver.recv(timeout=5)
        assert got is not None and got.request_id == msg.request_id
        return got
    raise AssertionError("the sender never got through")


def ctrl(**fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields})


class RawPeer:
    """Speaks the lease protocol by hand, to send what a correct sender never would."""

    def __init__(self, receiver: CudaIpcReceiver):
        self.receiver = receiver
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(receiver.address)

    def send(self, *frames: bytes) -> None:
        """Send, and let the receiver read it (nothing comes out of recv())."""
        self.sock.send_multipart(list(frames))
        assert self.receiver.recv(timeout=0.1) is None

    def reply(self) -> tuple[bytes, dict]:
        assert self.sock.poll(2000), "no reply from the receiver"
        kind, body = self.sock.recv_multipart()
        return kind, msgpack.unpackb(body)

    def attach(self, sender: str = "raw") -> dict:
        self.send(b"attach", ctrl(sender=sender))
        kind, lease = self.reply()
        assert kind == b"lease", (kind, lease)
        return lease
