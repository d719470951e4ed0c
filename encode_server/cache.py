"""Results by content key: finished ones in an LRU with a byte budget, unfinished ones in a
table of waiters, so an image that is asked for again while it is still being encoded is
encoded once and answered to everyone who asked.

The key is transfer.content_key (the bytes + the job's preprocessing options), computed from
the bytes the service actually read, never taken from the job: a peer cannot make the cache
serve one image's embeddings for another. It goes back in each EncodeResult, so the language
side keys its prefix cache with the same identity.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from models.qwen3_vision import Grid


@dataclass(frozen=True)
class Waiter:
    """Who to answer for one job."""

    request_id: str
    image_key: str  # the job's own key, echoed back so the language side can match the result
    reply_to: str
    received_at: float  # time.monotonic() when the job arrived, for the latency metric


@dataclass(frozen=True)
class Encoded:
    key: str  # the content key (reported to the language side as EncodeResult.content_key)
    grid: Grid
    embeddings: torch.Tensor  # [N, H*(1+k)] on the CPU, its own storage (so its size is its cost)


@dataclass
class Claim:
    """What `claim` decided: `hit` is set for a cached result; otherwise `leader` says whether
    this caller must encode the image (False: it joined one already being encoded)."""

    hit: Encoded | None = None
    leader: bool = False


@dataclass
class _Entry:
    value: Encoded
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.value.embeddings.numel() * self.value.embeddings.element_size()


class ResultCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._done: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._pending: dict[str, list[Waiter]] = {}
        self._lock = threading.Lock()

    def claim(self, key: str, waiter: Waiter) -> Claim:
        with self._lock:
            entry = self._done.get(key)
            if entry is not None:
                self._done.move_to_end(key)
                return Claim(hit=entry.value)
            if key in self._pending:
                self._pending[key].append(waiter)
                return Claim(leader=False)
            self._pending[key] = [waiter]
            return Claim(leader=True)

    def complete(self, key: str, value: Encoded) -> list[Waiter]:
        """Store a finished result (if it fits the budget); return everyone waiting for it."""
        entry = _Entry(value)
        with self._lock:
            if entry.nbytes <= self.max_bytes:
                old = self._done.pop(key, None)
                self.bytes -= old.nbytes if old else 0
                self._done[key] = entry
                self.bytes += entry.nbytes
                while self.bytes > self.max_bytes:
                    _, evicted = self._done.popitem(last=False)
                    self.bytes -= evicted.nbytes
            return self._pending.pop(key, [])

    def fail(self, key: str) -> list[Waiter]:
        """The image could not be encoded; return everyone waiting for it (nothing is cached,
        so a later job retries: the failure may have been the device's, not the image's)."""
        with self._lock:
            return self._pending.pop(key, [])

    def __len__(self) -> int:
        with self._lock:
            return len(self._done)
