"""Receiver-owned memory regions: the shared protocol of the cuda_ipc, shm and nixl transports.

The receiver owns one region (GPU memory for cuda_ipc, a memfd for shm, registered memory for
nixl) cut into `max_senders` leases. A sender attaches over zmq and is granted one lease; it
then writes tensor payloads straight into its lease (device to device for cuda_ipc: no host
staging) and sends a small DATA control message naming the spans. The receiver copies each
payload out of the region (on the region's device, ~10x faster than the link that filled it)
and FREEs the span, so the sender's ring of spans is recycled. Nothing big crosses zmq.
On a GPU the copy-out runs on a high-priority side stream of the receiver, so a span comes back
in microseconds even while the consumer's own stream is busy with a model step; the consumer's
current stream waits for it (on the GPU, not the host) before it can touch the tensor.

    sender                                   receiver (ROUTER, owns the region)
      ATTACH {sender, info}          ->
                                     <-      LEASE {session, lease, gen, offset, nbytes, export}
      write payloads into the lease (cuda_ipc: record a write fence; else wait until they landed)
      DATA {lease, gen, seq, spans, low, fence, count} + count codec headers + inline frames ->
                                             validate, copy out, return the message
                                     <-      FREE {lease, gen, seqs}
      PING (when idle, or waiting for space) / DETACH -> EXPIRED {reason} for an unknown or stale lease

Safety:
- Neither side ever sees half-written data. A DATA message either names a write fence (cuda_ipc:
  an interprocess CUDA event the sender recorded after its copies; the receiver copies the span
  out only once a host-side query says it completed) or is only sent after the sender's writes
  completed (shm, nixl). A span is only FREEd after the receiver's copy-out completed. The
  fence lets the cuda_ipc sender hand the DATA to zmq right after issuing its copy, with no
  host wait or thread hand-off per message. The receiver never makes its GPU wait on the
  sender's event: a sender killed before its copy ran leaves an event that never completes, and
  a stream waiting on it would hang for good; such a message waits on the host until the
  sender's lease is reclaimed, and is then dropped.
- Every control field and span is validated (bounds, alignment, owner, generation); the codec
  header is validated as for zmq. A bad message is logged and dropped, and its span still freed.
- FREEs are batched (up to half a lease) but never make a sender wait on an idle receiver: a
  DATA says `low` when its lease has no room left for another message of its size, and a sender
  that must wait for space PINGs; a receiver with nothing to read FREEs such a sender's spans
  at once.
- A sender that dies stops pinging; after `lease_timeout` its lease is reclaimed (generation
  bumped, so late messages for it are refused) and handed to the next sender. A receiver that
  restarts has a new session: old senders get EXPIRED and attach again. Messages in flight
  across a restart are lost, never half-delivered.
- Payloads too large for a lease, bytes fields and empty tensors travel inline as zmq frames;
  inline tensors are put on the receiver's device like the others.
"""

from __future__ import annotations

import abc
import collections
import math
from typing import Any

import msgpack
import numpy
import torch

from transfer.codec import (
    ProtocolError,
)
from transfer.messages import PROTOCOL_VERSION


ALIGN = 256  # span alignment: what cudaMalloc guarantees, enough for any dtype and vector loads
HEARTBEAT_S = 1.0  # an idle sender pings this often
ATTACH_RETRY_S = 0.5  # a sender without a lease asks again this often


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ----------------------------------------------------------------------- backend interface


class Fence(abc.ABC):
    """Completes when the writes (or reads) issued before it was taken are done.

    `wire`: for a fence the receiver can check itself (cuda_ipc's interprocess CUDA event), its
    handle, sent in the DATA message; the sender then sends at once instead of waiting. Empty:
    the sender waits for done() before sending."""

    wire: bytes = b""

    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def wait(self) -> None: ...


class Done(Fence):
    """For backends whose writes are synchronous."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class CudaEventFence(Fence):
    """A CUDA event recorded on `stream` (the stream's current end when taken); `event` may be
    an interprocess one whose handle is `wire`."""

    def __init__(self, stream: torch.cuda.Stream, event: torch.cuda.Event | None = None, wire: bytes = b""):
        self.event = event if event is not None else torch.cuda.Event()
        self.event.record(stream)
        self.wire = wire
        self.ordered: torch.cuda.Stream | None = None  # a stream already made to wait for it

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        self.event.synchronize()  # releases the GIL


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[:] = src for contiguous uint8 host tensors, as one single-threaded memcpy with the
    GIL released. torch's copy_ splits big copies over its intra-op thread pool, whose threads
    spin-wait between tasks; with sender and receiver processes both doing that on one node,
    they starve each other (and the zmq and I/O threads) for scheduler slices (2 MiB messages
    over shm on a 2-vCPU VM: 13.5 ms each with copy_, 0.68 ms with this)."""
    numpy.copyto(dst.numpy(), src.numpy())


IPC_EVENT_BYTES = 64  # sizeof(cudaIpcEventHandle_t): a DATA message's device write fence


class _OnStream:
    """`with _OnStream(stream):` issues work on `stream`, as torch.cuda.stream(stream) does, for a
    fraction of its host cost (~1 us instead of ~10 us on an H100 host; the receiver enters it
    once per message). It makes the same private calls as torch.cuda.set_stream, which also make
    the stream's device current, so both the current device's and the stream's device's current
    streams are restored on exit."""

    def __init__(self, stream: torch.cuda.Stream):
        self._stream = stream
        self._target = dict(stream_id=stream.stream_id, device_index=stream.device_index, device_type=stream.device_type)

    def __enter__(self) -> None:
        here = torch._C._cuda_getDevice()
        self._prev_here = torch._C._cuda_getCurrentStream(here)
        self._prev_there = None if here == self._stream.device_index else torch._C._cuda_getCurrentStream(self._stream.device_index)
        torch._C._cuda_setStream(**self._target)

    def __exit__(self, *exc: Any) -> None:
        for prev in (self._prev_there, self._prev_here):  # the current device's stream last: it is made current
            if prev is not None:
                torch._C._cuda_setStream(stream_id=prev[0], device_index=prev[1], device_type=prev[2])


class CurrentStream:
    """torch.cuda.current_stream(device), minus the ~3 us of building a new Stream object per
    call: the last one is kept and reused while it is still the current stream."""

    def __init__(self, device: torch.device):
        self._index = device.index
        self._key: tuple | None = None
        self._stream: torch.cuda.Stream | None = None

    def __call__(self) -> torch.cuda.Stream:
        key = torch._C._cuda_getCurrentStream(self._index)
        if key != self._key:
            self._stream = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
            self._key = key
        return self._stream


class RegionMemory(abc.ABC):
    """The receiver's region."""

    device: torch.device
    nbytes: int
    _copy_stream: torch.cuda.Stream | None = None
    _typed: dict[torch.dtype, torch.Tensor] | None = None

    @abc.abstractmethod
    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 tensor aliasing region bytes [offset, offset + nbytes)."""

    @abc.abstractmethod
    def export(self) -> dict[str, Any]:
        """What one sender needs to write into the region (msgpack-able). Called once per
        granted lease, so a backend can count its importers (cuda_ipc does)."""

    def open_fence(self, wire: bytes) -> Any:
        """The sender's write fence named by a DATA message, opened so the receiver can query it
        (it caches it per lease). Only a GPU region's receiver can."""
        if self.device.type != "cuda":
            raise ProtocolError("a DATA message names a device write fence, but this region is in host memory")
        if len(wire) != IPC_EVENT_BYTES:
            raise ProtocolError(f"write fence of {len(wire)} bytes (a CUDA IPC event handle is {IPC_EVENT_BYTES})")
        try:
            return torch.cuda.Event.from_ipc_handle(self.device, wire)
        except RuntimeError as exc:
            raise ProtocolError(f"cannot open the sender's write fence: {exc}") from None

    def _typed_view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The region bytes at `offset` as a tensor of `dtype` and `shape`. Slices one cached
        typed view of the whole region: re-viewing uint8 bytes as another dtype costs tens of
        microseconds per call on a GPU host. Offsets are ALIGN-aligned, so itemsize divides them."""
        if self._typed is None:
            self._typed = {}
        whole = self._typed.get(dtype)
        if whole is None:
            whole = self._typed[dtype] = self.view(0, self.nbytes).view(dtype)
        start = offset // dtype.itemsize
        return whole[start : start + math.prod(shape)].view(shape)

    def copy_out(self, spans: list[tuple[int, torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        """New tensors holding the region bytes of each (offset, dtype, shape), for the consumer
        to keep; the spans can be recycled once fence() taken after this completes.

        On a GPU the copies run on the region's own high-priority stream, not behind whatever the
        consumer has queued on its stream; fence() makes the consumer's current stream wait for
        them, and record_stream keeps the allocator from reusing the memory under the consumer."""
        if self.device.type != "cuda":
            outs = []
            for offset, dtype, shape in spans:
                out = torch.empty(shape, dtype=dtype, device=self.device)
                host_copy(out.view(-1).view(torch.uint8), self.view(offset, out.nbytes))
                outs.append(out)
            return outs
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device, priority=-1)
            self._on_copy_stream = _OnStream(self._copy_stream)
            self._consumer_stream = CurrentStream(self.device)
        sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in spans]
        lo = min(offset for offset, _, _ in spans)
        hi = max(offset + n for (offset, _, _), n in zip(spans, sizes, strict=True))
        if len(spans) > 1 and hi - lo <= sum(sizes) + ALIGN * len(spans):
            # A batch's payloads lie side by side (send_many writes them so): one copy of the
            # whole range and views of it cost far less host time than a copy each. The views
            # share one buffer, freed when the last of them goes.
            with self._on_copy_stream:
                block = self.view(lo, hi - lo).clone()
            block.record_stream(self._consumer_stream())
            return [block[offset - lo : offset - lo + n].view(dtype).view(shape)
                    for (offset, dtype, shape), n in zip(spans, sizes, strict=True)]
        with self._on_copy_stream:
            outs = [self._typed_view(offset, dtype, shape).clone() for offset, dtype, shape in spans]  # allocated for, and copied on, the copy stream
        consumer = self._consumer_stream()
        for out in outs:
            out.record_stream(consumer)
        return outs

    def fence(self) -> Fence:
        """Completes when the copy_out() calls made so far are done. On a GPU it also orders the
        consumer's current stream after them."""
        if self._copy_stream is None:
            return Done()  # host copies are synchronous; no GPU copy issued yet
        fence = CudaEventFence(self._copy_stream)
        fence.ordered = self._consumer_stream()
        fence.ordered.wait_event(fence.event)
        return fence

    def hand_over(self, tensors: list[torch.Tensor], fence: Fence) -> None:
        """Make tensors copied out before `fence` was taken usable on the caller's current
        stream. fence() ordered the stream current then; a batch's later messages may be taken
        under another one, which must wait too (and keep the memory from early reuse)."""
        if not isinstance(fence, CudaEventFence) or not tensors:
            return  # host copies are synchronous
        current = self._consumer_stream()
        if current is not fence.ordered:
            current.wait_event(fence.event)
            for tensor in tensors:
                tensor.record_stream(current)

    @abc.abstractmethod
    def close(self) -> None: ...


class RegionWriter(abc.ABC):
    """A sender's handle on a receiver's region."""

    @abc.abstractmethod
    def write(self, offset: int, src: torch.Tensor) -> None:
        """Start copying the contiguous uint8 tensor `src` to region offset `offset`."""

    @abc.abstractmethod
    def fence(self) -> Fence:
        """Completes when all writes started so far have landed in the region."""

    @abc.abstractmethod
    def close(self) -> None: ...


# ------------------------------------------------------------------------ control messages
# Frame 0 names the kind (b"attach", b"data", ...), frame 1 is a msgpack map with exactly these keys.


def unpack_ctrl(raw: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """Decode and check one control map: exactly the schema's keys, each of its type."""
    try:
        ctrl = msgpack.unpackb(raw, raw=False, strict_map_key=True, timestamp=0,
                               ext_hook=lambda code, data: ProtocolError("ext"))
    except Exception as exc:
        raise ProtocolError(f"control message is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(ctrl, dict) or set(ctrl) != set(schema) | {"v"}:
        raise ProtocolError(f"control message keys {sorted(map(str, ctrl)) if isinstance(ctrl, dict) else ctrl!r:.100} "
                            f"!= {sorted(set(schema) | {'v'})}")
    if ctrl["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {ctrl['v']!r} (this build speaks {PROTOCOL_VERSION})")
    for key, kind in schema.items():
        value = ctrl[key]
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ProtocolError(f"control field {key!r} has a bad value {value!r:.60}")
    return ctrl


def pack_ctrl(**fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields}, use_bin_type=True)


ATTACH = {"sender": str, "backend": str}
LEASE = {"session": int, "lease": int, "gen": int, "offset": int, "nbytes": int, "export": dict}
DATA = {"session": int, "lease": int, "gen": int, "seq": int, "spans": list, "low": bool, "fence": bytes, "count": int}
PING = {"session": int, "lease": int, "gen": int}
FREE = {"session": int, "lease": int, "gen": int, "seqs": list}
EXPIRED = {"session": int, "reason": str}
REFUSE = {"reason": str, "retry": bool}  # retry: a lease may come free later
NO_LEASE = (1 << 63) - 1  # DATA with only inline frames names no lease
MAX_BATCH = 64  # messages one DATA may carry (send_many)


# ---------------------------------------------------------------------- the sender's spans


class Ring:
    """Spans of a lease in allocation order; space returns when the oldest spans are freed."""

    def __init__(self, size: int):
        self.size = size
        self.live: collections.deque[list] = collections.deque()  # [seq, start, end, freed]
        self._by_seq: dict[int, list] = {}  # a FREE may name hundreds of seqs

    def fit(self, n: int) -> int | None:
        """Where the next span of n bytes would start, or None if there is no room now."""
        if not self.live:
            return 0 if n <= self.size else None
        oldest, newest_end = self.live[0][1], self.live[-1][2]
        if self.live[-1][1] >= oldest:  # not wrapped: free space at the end and the start
            return newest_end if self.size - newest_end >= n else (0 if oldest >= n else None)
        return newest_end if oldest - newest_end >= n else None  # wrapped: space between newest and oldest

    def alloc(self, seq: int, n: int) -> int | None:
        start = self.fit(n)
        if start is not None:
            span = [seq, start, start + n, False]
            self.live.append(span)
            self._by_seq[seq] = span
        return start

    def free(self, seq: int) -> None:
        span = self._by_seq.pop(seq, None)
        if span is None:  # not ours (a peer's bug): nothing to free
            return
        span[3] = True
        while self.live and self.live[0][3]:
            self.live.popleft()
