"""`cuda_ipc`: encode and language services on different GPUs of one node.

The receiver (language side) owns a region of its GPU's memory and exports a CUDA IPC handle
for it. The sender (encode side) opens the handle and copies its results device to device
into its lease (NVLink / PCIe peer copy, no host staging); only a small control message goes
over zmq. See transfer/region.py for the lease protocol and its safety rules.

No pickle and no torch.multiprocessing: the IPC handle comes from the storage's own
`_share_cuda_()` and is rebuilt with `UntypedStorage._new_shared_cuda(...)` (the two calls
torch.multiprocessing itself uses), and its bytes travel in the msgpack LEASE message.

The receiver's GPU must be visible to the sender process (CUDA_VISIBLE_DEVICES): it is found
by UUID, because device indexes differ between processes that see different GPU sets.
"""

from __future__ import annotations

from typing import Any

import torch

from transfer.base import TransportError
from transfer.region import Fence, RegionMemory, RegionWriter
from transfer.region_receiver import RegionReceiver
from transfer.region_sender import RegionSender


class _EventFence(Fence):
    def __init__(self, device: torch.device):
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        return self._event.query()

    def wait(self) -> None:
        self._event.synchronize()


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

    def fence(self) -> Fence:
        return _EventFence(self.device)  # copy-outs run on the region device's current stream

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._buf = None


class _CudaWriter(RegionWriter):
    def __init__(self, export: dict[str, Any], lease_offset: int, lease_nbytes: int):
        torch.cuda.init()  # as torch.multiprocessing does before rebuilding a shared CUDA storage
        try:
            index = _device_with_uuid(export["uuid"])
            storage = torch.UntypedStorage._new_shared_cuda(
                index, export["handle"], export["size"], export["offset"], export["ref_counter"],
                export["ref_counter_offset"], export["event_handle"], export["event_sync"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise TransportError(f"cannot open the receiver's CUDA IPC region: {exc}") from exc
        self._device = torch.device("cuda", index)
        self._region = torch.empty(0, dtype=torch.uint8, device=self._device).set_(storage)

    def write(self, offset: int, src: torch.Tensor) -> None:
        # A peer copy when src is on another GPU: torch issues it on src's current stream and
        # makes the region device's current stream wait for it, which the fence records.
        self._region[offset : offset + src.numel()].copy_(src, non_blocking=True)

    def fence(self) -> Fence:
        return _EventFence(self._device)

    def close(self) -> None:
        self._region = None  # torch syncs, drops its reference count and closes the handle


class CudaIpcSender(RegionSender):
    backend = "cuda_ipc"

    def __init__(self, address: str, **options: Any):
        super().__init__(address, _CudaWriter, **options)


class CudaIpcReceiver(RegionReceiver):
    backend = "cuda_ipc"

    def __init__(self, address: str, *, device: str | torch.device = "cuda:0", lease_bytes: int = 64 << 20,
                 max_senders: int = 4, **options: Any):
        super().__init__(address, _CudaRegion(lease_bytes * max_senders, device), lease_bytes=lease_bytes,
                         max_senders=max_senders, **options)
