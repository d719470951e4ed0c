"""`shm`: the region protocol over host shared memory, for services on one node without GPUs
(or with tensors in host memory). The receiver's region is an anonymous memfd; the sender maps
it through /proc/<pid>/fd/<fd>, so nothing is left behind in /dev/shm when either side dies.

Both processes must share a PID namespace and user (the sender gets a clear error otherwise).
A random token in the region's first page proves the sender mapped the right file.
"""

from __future__ import annotations

import mmap
import os
import secrets
from typing import Any

import torch

from transfer.base import TransportError
from transfer.region import Done, Fence, RegionMemory, RegionWriter, host_copy
from transfer.region_receiver import RegionReceiver
from transfer.region_sender import RegionSender

_TOKEN_BYTES = 32
_PAGE = 4096  # region data starts after the token page


class _MemfdRegion(RegionMemory):
    def __init__(self, nbytes: int):
        self.device = torch.device("cpu")
        self.nbytes = nbytes
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        self._fd = os.memfd_create("splitvl-region", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, _PAGE + nbytes)
        self._map = mmap.mmap(self._fd, _PAGE + nbytes)
        self._map[:_TOKEN_BYTES] = self._token
        self._data = torch.frombuffer(self._map, dtype=torch.uint8)[_PAGE:]

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._data[offset : offset + nbytes]

    def export(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "fd": self._fd, "nbytes": self.nbytes, "token": self._token}

    def close(self) -> None:
        self._data = None  # release the buffer export before unmapping
        self._map.close()
        os.close(self._fd)


class _MemfdWriter(RegionWriter):
    def __init__(self, export: dict[str, Any], lease_offset: int, lease_nbytes: int):
        try:
            pid, fd, nbytes, token = (export[k] for k in ("pid", "fd", "nbytes", "token"))
            path = f"/proc/{int(pid)}/fd/{int(fd)}"
            handle = os.open(path, os.O_RDWR)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise TransportError(
                f"cannot open the receiver's shared memory ({exc}); the shm transport needs both "
                "processes on one node, in one PID namespace, as one user (use zmq otherwise)") from exc
        try:
            if os.fstat(handle).st_size != _PAGE + nbytes:
                raise TransportError(f"{path} is not the receiver's region (size mismatch)")
            self._map = mmap.mmap(handle, _PAGE + nbytes)
        finally:
            os.close(handle)
        if self._map[:_TOKEN_BYTES] != token:
            self._map.close()
            raise TransportError(f"{path} is not the receiver's region (token mismatch)")
        self._data = torch.frombuffer(self._map, dtype=torch.uint8)[_PAGE:]

    def write(self, offset: int, src: torch.Tensor) -> None:
        dst = self._data[offset : offset + src.numel()]
        if src.device.type == "cpu":
            host_copy(dst, src)
        else:
            dst.copy_(src)  # synchronous; device tensors come to host

    def fence(self) -> Fence:
        return Done()

    def close(self) -> None:
        self._data = None
        self._map.close()


class ShmSender(RegionSender):
    backend = "shm"

    def __init__(self, address: str, **options: Any):
        super().__init__(address, _MemfdWriter, **options)


class ShmReceiver(RegionReceiver):
    backend = "shm"

    def __init__(self, address: str, *, lease_bytes: int = 64 << 20, max_senders: int = 4, **options: Any):
        super().__init__(address, _MemfdRegion(lease_bytes * max_senders), lease_bytes=lease_bytes,
                         max_senders=max_senders, **options)
