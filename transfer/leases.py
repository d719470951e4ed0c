"""The lease protocol of cuda_ipc: its control messages and the sender's ring of spans.

The receiver owns one region of GPU memory cut into `max_senders` leases. A sender ATTACHes and
is granted a LEASE; it copies each message's tensors into a span of its lease, records an
interprocess CUDA event behind the copies (the write fence) and sends a DATA naming the spans
and the fence; the receiver queries the fence on the host, copies the payloads out and FREEs the
span. docs/transfer.md gives the sequence and the safety rules: a span is reused only after its
FREE (the Ring below); a span is read only after its write fence completed; a silent sender's
lease is reclaimed, and a live one PINGs before it writes through a lease it has not heard about
lately; every control message is checked, and a bad one logged and dropped.
"""

from __future__ import annotations

import collections
from typing import Any

import msgpack

from transfer.codec import ProtocolError, check_version, unpack_map
from transfer.messages import PROTOCOL_VERSION

ALIGN = 256  # span alignment: what cudaMalloc guarantees, enough for any dtype and vector loads
IPC_EVENT_BYTES = 64  # sizeof(cudaIpcEventHandle_t): the write fence a DATA message names
MAX_EVENTS = 16  # write fences a sender has in use at once


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# Frame 0 of a control message names its kind (b"attach", b"data", ...); frame 1 is a msgpack map
# with exactly these keys and "v".
ATTACH = {"sender": str}
LEASE = {"session": int, "lease": int, "gen": int, "offset": int, "nbytes": int, "timeout_ms": int, "export": dict}
REFUSE = {"reason": str}
DATA = {"session": int, "lease": int, "gen": int, "seq": int, "spans": list, "fence": bytes}
FREE = {"session": int, "lease": int, "gen": int, "seq": int}
PING = {"session": int, "lease": int, "gen": int}  # also PONG and DETACH
EXPIRED = {"session": int, "lease": int, "gen": int, "reason": str}


def pack_ctrl(**fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields}, use_bin_type=True)


def unpack_ctrl(raw: Any, schema: dict[str, type]) -> dict[str, Any]:
    """Decode and check one control map: exactly the schema's keys, each of its type (ints
    non-negative and below 2**63)."""
    ctrl = unpack_map(raw, "control message")
    check_version(ctrl.get("v"))
    if set(ctrl) != set(schema) | {"v"}:
        raise ProtocolError(f"control message keys {sorted(map(str, ctrl))} != {sorted(set(schema) | {'v'})}")
    for key, kind in schema.items():
        value = ctrl[key]
        if kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ProtocolError(f"control field {key!r} has a bad value {value!r:.60}")
    return ctrl


def lease_key(ctrl: dict[str, Any]) -> tuple[int, int, int]:
    """(session, lease, gen): what names one grant of one lease."""
    return ctrl["session"], ctrl["lease"], ctrl["gen"]


class Ring:
    """The spans of one lease in allocation order. Space comes back only when the oldest spans
    are freed, so a span is never handed out again while the receiver may still read it."""

    def __init__(self, size: int):
        self.size = size
        self.live: collections.deque[list] = collections.deque()  # [seq, start, end, freed], oldest first
        self._by_seq: dict[int, list] = {}

    def alloc(self, seq: int, n: int) -> int | None:
        """The start of a new span of n bytes for `seq`, or None if there is no room now."""
        start = self._fit(n)
        if start is not None:
            span = [seq, start, start + n, False]
            self.live.append(span)
            self._by_seq[seq] = span
        return start

    def free(self, seq: int) -> None:
        span = self._by_seq.pop(seq, None)
        if span is None:  # not one of ours (a peer's bug): nothing to free
            return
        span[3] = True
        while self.live and self.live[0][3]:
            self.live.popleft()

    def _fit(self, n: int) -> int | None:
        if not self.live:
            return 0 if n <= self.size else None
        oldest, newest_end = self.live[0][1], self.live[-1][2]
        if self.live[-1][1] >= oldest:  # not wrapped: room at the end, else at the start
            if self.size - newest_end >= n:
                return newest_end
            return 0 if oldest >= n else None
        return newest_end if oldest - newest_end >= n else None  # wrapped: room between newest and oldest
