"""`nixl`: the region protocol with NIXL (UCX underneath: RDMA where the NICs have it, TCP or
shared memory otherwise) moving the bytes. The cross-node engine for deployments that outgrow
zmq's host-staged TCP.

The receiver registers its region (host or GPU memory) with a NIXL agent and exports the
agent's metadata plus the region's address in the LEASE message; the sender registers a
staging buffer the size of its lease, copies each payload there (a device-local copy) and
issues a NIXL WRITE into the same span of the receiver's region. DATA goes over zmq only after
NIXL reports the write done. See transfer/region.py for leases, recycling and safety.

NIXL is optional: `pip install nixl`. Without it, asking for this transport raises a
TransportError that says so; nothing else in splitvl imports it.

NIXL's own descriptor serialisation uses pickle; we never call it. Descriptors travel as plain
(address, length, device) numbers in msgpack, and the agent metadata as the opaque bytes NIXL
itself parses.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch

from transfer.base import TransportError
from transfer.region import Fence, RegionMemory, RegionWriter
from transfer.region_receiver import RegionReceiver
from transfer.region_sender import RegionSender


def _nixl() -> Any:
    try:
        from nixl import _api
    except ImportError as exc:
        raise TransportError(
            "the nixl transport needs the optional NIXL package, which is not installed "
            f"({exc}); install it with `pip install nixl` (it brings UCX), or choose the zmq "
            "transport in the config") from exc
    return _api


def _agent(role: str) -> Any:
    api = _nixl()
    # No listener thread: metadata travels in our own zmq LEASE message. STRICT thread sync:
    # the sender's caller thread starts writes while its I/O thread polls and releases them.
    options: dict[str, Any] = {"backends": ["UCX"]}
    if hasattr(api, "nixl_thread_sync_t"):
        options["sync_mode"] = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
    return api.nixl_agent(f"splitvl-{role}-{uuid.uuid4().hex[:12]}", api.nixl_agent_config(**options))


def _place(tensor: torch.Tensor) -> tuple[str, int]:
    """NIXL memory type and device id of a tensor."""
    return ("VRAM", tensor.device.index) if tensor.is_cuda else ("DRAM", 0)


class _XferFence(Fence):
    def __init__(self, agent: Any, handles: list):
        self._agent = agent
        self._handles = handles

    def done(self) -> bool:
        return all(self._state(h) == "DONE" for h in self._handles)

    def _state(self, handle: Any) -> str:
        state = self._agent.check_xfer_state(handle)
        if state == "ERR":
            raise TransportError("a NIXL write failed (the receiver may be gone)")
        return state

    def wait(self) -> None:
        for handle in self._handles:
            while self._state(handle) != "DONE":
                time.sleep(20e-6)  # NIXL's progress thread moves the data; let the GIL go meanwhile
            self._agent.release_xfer_handle(handle)
        self._handles = []


class _NixlRegion(RegionMemory):
    def __init__(self, nbytes: int, device: str | torch.device):
        self._agent = _agent("receiver")
        self.device = torch.device(device)
        self.nbytes = nbytes
        self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._registered = self._agent.register_memory(self._buf)
        mem, dev = _place(self._buf)
        self._export = {"metadata": self._agent.get_agent_metadata(), "addr": self._buf.data_ptr(),
                        "mem": mem, "dev": dev}

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._buf[offset : offset + nbytes]

    def export(self) -> dict[str, Any]:
        return self._export

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._agent.deregister_memory(self._registered)
        self._buf = None


class _NixlWriter(RegionWriter):
    _agent_cache: Any = None  # one agent per process: creating one costs ~0.3 s

    def __init__(self, export: dict[str, Any], lease_offset: int, lease_nbytes: int, device: torch.device):
        if _NixlWriter._agent_cache is None:
            _NixlWriter._agent_cache = _agent("sender")
        self._agent = _NixlWriter._agent_cache
        try:
            self._peer = self._agent.add_remote_agent(export["metadata"])
            self._remote = (int(export["addr"]), str(export["mem"]), int(export["dev"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"bad NIXL export from the receiver: {exc}") from exc
        self._lease_offset = lease_offset
        self._staging = torch.empty(lease_nbytes, dtype=torch.uint8, device=device)
        self._registered = self._agent.register_memory(self._staging)
        self._mem, self._dev = _place(self._staging)
        self._handles: list = []

    def write(self, offset: int, src: torch.Tensor) -> None:
        n = src.numel()
        local = offset - self._lease_offset
        self._staging[local : local + n].copy_(src)
        if self._staging.is_cuda:  # NIXL reads the staging buffer outside torch's streams
            torch.cuda.current_stream(self._staging.device).synchronize()
        addr, mem, dev = self._remote
        handle = self._agent.initialize_xfer(
            "WRITE",
            self._agent.get_xfer_descs([(self._staging.data_ptr() + local, n, self._dev)], self._mem),
            self._agent.get_xfer_descs([(addr + offset, n, dev)], mem),
            self._peer,
        )
        if self._agent.transfer(handle) == "ERR":
            raise TransportError("NIXL refused to start a write (the receiver may be gone)")
        self._handles.append(handle)

    def fence(self) -> Fence:
        fence, self._handles = _XferFence(self._agent, self._handles), []
        return fence

    def close(self) -> None:
        _XferFence(self._agent, self._handles).wait()
        self._agent.deregister_memory(self._registered)
        self._agent.remove_remote_agent(self._peer)
        self._staging = None


class NixlSender(RegionSender):
    backend = "nixl"

    def __init__(self, address: str, *, device: str | torch.device = "cpu", **options: Any):
        _nixl()  # fail here, with the install hint, rather than in the I/O thread
        staging = torch.device(device)
        super().__init__(address, lambda export, offset, nbytes: _NixlWriter(export, offset, nbytes, staging), **options)


class NixlReceiver(RegionReceiver):
    backend = "nixl"

    def __init__(self, address: str, *, device: str | torch.device = "cpu", lease_bytes: int = 64 << 20,
                 max_senders: int = 4, **options: Any):
        super().__init__(address, _NixlRegion(lease_bytes * max_senders, device), lease_bytes=lease_bytes,
                         max_senders=max_senders, **options)
