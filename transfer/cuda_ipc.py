"""`cuda_ipc`: encode and language services on different GPUs of one node.

The receiver (language side) owns a region of its GPU's memory and exports a CUDA IPC handle
for it. The sender (encode side) opens the handle on its own GPU and copies its results device
to device into its lease (NVLink / PCIe peer copy, no host staging); only a small control
message goes over zmq. That DATA message names an interprocess CUDA event the sender recorded
after its copies (the write fence), so the sender never waits for the link; the receiver checks
the event and copies each payload out on a side stream of its GPU. See transfer/region.py for
the lease protocol and its safety rules.

No pickle and no torch.multiprocessing: the IPC handle comes from the storage's own
`_share_cuda_()` and is rebuilt with `UntypedStorage._new_shared_cuda(...)` (the two calls
torch.multiprocessing itself uses), and its bytes travel in the msgpack LEASE message.

The receiver's GPU must be visible to the sender process (CUDA_VISIBLE_DEVICES): it is found
by UUID, because device indexes differ between processes that see different GPU sets.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any

import torch

from transfer.base import TransportError
from transfer.region import CudaEventFence, CurrentStream, Done, Fence, RegionMemory, RegionWriter
from transfer.region_receiver import RegionReceiver
from transfer.region_sender import RegionSender

log = logging.getLogger(__name__)


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _device_with_uuid(uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if _uuid(index) == uuid:
            return index
    raise TransportError(
        f"the receiver's GPU {uuid} is not visible to this process (it sees "
        f"{[_uuid(i) for i in range(torch.cuda.device_count())]}); make both GPUs visible to the "
        "sender, e.g. CUDA_VISIBLE_DEVICES=0,1, and pick its own GPU with torch.cuda.set_device")


class _CudaRegion(RegionMemory):
    def __init__(self, nbytes: int, device: str | torch.device):
        if not torch.cuda.is_available():
            raise TransportError("cuda_ipc needs a CUDA GPU; use the zmq or shm transport on CPU")
        self.device = torch.device(device)
        if self.device.type != "cuda" or self.device.index is None:
            raise TransportError(f"cuda_ipc region device must be cuda:N, got {device!r}")
        self.nbytes = nbytes
        self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def export(self) -> dict[str, Any]:
        # A fresh export per lease: torch counts each export's importer, and memory an importer
        # still maps is kept out of the allocator's reuse (its "limbo") until that importer lets
        # go, so closing the receiver can never hand a live sender's span to other tensors.
        (_, handle, size, offset, ref_counter, ref_counter_offset,
         event_handle, event_sync) = self._buf.untyped_storage()._share_cuda_()
        return {
            "uuid": _uuid(self.device.index), "handle": handle, "size": size, "offset": offset,
            "ref_counter": ref_counter, "ref_counter_offset": ref_counter_offset,
            "event_handle": event_handle, "event_sync": bool(event_sync),
        }

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._buf[offset : offset + nbytes]

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._buf = None


class _CudaWriter(RegionWriter):
    """Maps the receiver's region into this process and copies payloads into it.

    The region is mapped on the GPU the payloads live on (that of the first write; the I/O
    thread that builds the writer need not have the sender's current device), with peer
    access, not on the GPU that owns it. Writes are then plain device-to-device copies that the
    sender's copy engine pushes over NVLink / PCIe peer-to-peer. Mapped on the owning GPU (what
    torch.multiprocessing does), the same copy becomes a copy between devices into memory the
    source GPU has no peer mapping of, which the driver stages through host memory: ~10x slower
    on two NVLinked H200s (docs/transfer.md). `map_on="owner"` keeps that path, for comparison.
    """

    FENCE_EVENTS = 32  # interprocess events the write fences use at most (the receiver accepts 64)

    def __init__(self, export: dict[str, Any], lease_offset: int, lease_nbytes: int, map_on: str = "sender",
                 device_fence: bool = True):
        torch.cuda.init()  # as torch.multiprocessing does before rebuilding a shared CUDA storage
        try:
            self._owner = _device_with_uuid(export["uuid"])
            self._args = (export["handle"], export["size"], export["offset"], export["ref_counter"],
                          export["ref_counter_offset"], export["event_handle"], export["event_sync"])
        except (KeyError, TypeError) as exc:
            raise TransportError(f"bad CUDA IPC export from the receiver: {exc!r}") from exc
        self._map_on = map_on
        self._device_fence = device_fence
        self._region: torch.Tensor | None = None
        self.device: torch.device | None = None
        self._events: collections.deque[tuple[torch.cuda.Event, bytes]] = collections.deque()  # least recently used first

    def _map(self, near: int) -> None:
        places = [self._owner]
        if self._map_on == "sender" and near != self._owner and torch.cuda.can_device_access_peer(near, self._owner):
            places.insert(0, near)
        for index in places:
            try:
                storage = torch.UntypedStorage._new_shared_cuda(index, *self._args)
            except (TypeError, RuntimeError) as exc:
                if index == places[-1]:
                    raise TransportError(f"cannot open the receiver's CUDA IPC region: {exc}") from exc
                log.warning("cannot map the receiver's region (on GPU %d) on GPU %d (%s); mapping it on its own "
                            "GPU, which makes copies from GPU %d go through host memory", self._owner, index, exc, index)
                continue
            self.device = torch.device("cuda", index)
            self._region = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
            self._current_stream = CurrentStream(self.device)
            return

    def write(self, offset: int, src: torch.Tensor) -> None:
        if self._region is None:  # once per lease
            self._map(src.device.index if src.is_cuda else torch.cuda.current_device())
        # Issued on src's current stream; the fence records the mapping device's current stream
        # (the same stream when src lives on the GPU the region is mapped on).
        self._region[offset : offset + src.numel()].copy_(src, non_blocking=True)

    def fence(self) -> Fence:
        """With device fences, an interprocess event the receiver checks before it copies the
        span out: the DATA goes out at once. Without, a local event the sender's I/O thread
        waits for before it sends the DATA."""
        if self._region is None:
            return Done()  # nothing written through this writer yet
        stream = self._current_stream()
        if not self._device_fence:
            return CudaEventFence(stream)
        event, wire = self._idle_event()
        self._events.append((event, wire))
        return CudaEventFence(stream, event, wire)

    def _idle_event(self) -> tuple[torch.cuda.Event, bytes]:
        """An interprocess event whose last record has completed. Re-recording one that has not
        would let the receiver's query of the earlier DATA see the new record instead: safe on
        one stream (copies complete in order), wrong if the caller switched streams between
        sends. So the oldest is reused only once done; else a new one, up to FENCE_EVENTS; else
        the oldest is waited for (the receiver is that far behind anyway)."""
        if self._events and self._events[0][0].query():
            return self._events.popleft()
        if len(self._events) < self.FENCE_EVENTS:
            with torch.cuda.device(self.device):  # an event's handle is made on the current device
                event = torch.cuda.Event(interprocess=True)
                return event, event.ipc_handle()
        event, wire = self._events.popleft()
        event.synchronize()
        return event, wire

    def close(self) -> None:
        self._region = None  # torch syncs, drops its reference count and closes the handle


class CudaIpcSender(RegionSender):
    """The receiver's region is mapped on the GPU of the first tensor sent through each lease:
    send from one GPU. `map_on="owner"` maps it on the receiver's GPU instead (the slow,
    host-staged path; for comparison in benchmarks). `device_fence=False` makes the sender wait
    until its copies landed before each DATA, instead of naming an interprocess event for the
    receiver's GPU to wait on (the slower path before device fences; for comparison)."""

    backend = "cuda_ipc"

    def __init__(self, address: str, *, map_on: str = "sender", device_fence: bool = True, **options: Any):
        if map_on not in ("sender", "owner"):
            raise ValueError(f"map_on must be 'sender' or 'owner', got {map_on!r}")
        super().__init__(address, functools.partial(_CudaWriter, map_on=map_on, device_fence=device_fence), **options)


class CudaIpcReceiver(RegionReceiver):
    backend = "cuda_ipc"

    def __init__(self, address: str, *, device: str | torch.device = "cuda:0", lease_bytes: int = 64 << 20,
                 max_senders: int = 4, **options: Any):
        super().__init__(address, _CudaRegion(lease_bytes * max_senders, device), lease_bytes=lease_bytes,
                         max_senders=max_senders, **options)
