"""The three CUDA runtime calls of the cuda_ipc hot path, made directly through ctypes.

Per message the cuda_ipc sender issues a device-to-device copy and records an event, and the
receiver queries that event. Through torch each of these goes through its dispatcher, device
guards and Python wrappers: several microseconds apiece on a GPU host's slow Python, against
~1 us for a ctypes call into the same libcudart torch itself loaded (docs/transfer.md). The
handles are torch's own (`Stream.cuda_stream`, `Event.cuda_event`), so streams, events and the
caching allocator stay torch's; only the calls are made here.

`load()` returns None where the runtime torch uses cannot be found in this process (a CPU
build, or a torch that links cudart statically), or with SPLITVL_CUDART=0 (for comparison);
callers then use torch's calls.
"""

from __future__ import annotations

import ctypes
import functools
import os

SUCCESS = 0
NOT_READY = 600  # cudaErrorNotReady
DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice (UVA: either side may be a peer mapping)


class Cudart:
    def __init__(self, lib: ctypes.CDLL):
        self.memcpy_async = lib.cudaMemcpyAsync
        self.memcpy_async.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.memcpy_async.restype = ctypes.c_int
        self.event_record = lib.cudaEventRecord
        self.event_record.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.event_record.restype = ctypes.c_int
        self.event_query = lib.cudaEventQuery
        self.event_query.argtypes = [ctypes.c_void_p]
        self.event_query.restype = ctypes.c_int
        self.get_last_error = lib.cudaGetLastError
        self.get_last_error.restype = ctypes.c_int
        self._error_string = lib.cudaGetErrorString
        self._error_string.argtypes = [ctypes.c_int]
        self._error_string.restype = ctypes.c_char_p

    def error(self, code: int) -> str:
        """The message for a failed call's code, clearing the runtime's last error: torch checks
        that after its own launches, and would otherwise blame one of them for ours."""
        self.get_last_error()
        return f"{self._error_string(code).decode()} ({code})"

    def query(self, event: int) -> bool:
        """cudaEventQuery as torch's Event.query: done or not, RuntimeError on a failure."""
        code = self.event_query(event)
        if code == SUCCESS:
            return True
        if code == NOT_READY:
            self.get_last_error()  # as torch does: "not ready" is no error to report later
            return False
        raise RuntimeError(f"cudaEventQuery: {self.error(code)}")

    def check(self, code: int, what: str) -> None:
        if code != SUCCESS:
            raise RuntimeError(f"{what}: {self.error(code)}")


def _loaded_cudart() -> str | None:
    """The path of the libcudart this process has mapped (torch's), if any."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcudart.so" in path:
                    return path
    except OSError:
        pass
    return None


@functools.cache
def load() -> Cudart | None:
    """The runtime torch loaded (with `import torch`, for a CUDA build); None if none."""
    if os.environ.get("SPLITVL_CUDART", "1") == "0":
        return None
    path = _loaded_cudart()
    if path is None:
        return None
    try:
        return Cudart(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    except (OSError, AttributeError):
        return None
