"""Groups preprocessed images from many jobs into varlen vision forwards.

A batch closes when its patches would pass the token budget, or when its oldest image has
waited `max_wait_s`. Waiting is counted from when that image was queued, not from when the
vision loop asked: while a forward runs, images pile up, and the next batch then leaves at
once with what is there. Images keep their arrival order; one larger than the whole budget
runs alone.

Legend: P patches (vision tokens before the merge), D = 3*2*16*16 values per patch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from models.qwen3_vision import Grid


@dataclass
class VisionItem:
    key: str  # content key; the cache's waiters for it get the result
    pixel_values: torch.Tensor  # [P, D] in the model dtype (VisionRunner.host_pixel_values)
    grid: Grid
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def patches(self) -> int:
        return self.pixel_values.shape[0]


class Batcher:
    def __init__(self, token_budget: int, max_wait_s: float) -> None:
        self.token_budget = token_budget
        self.max_wait_s = max_wait_s
        self._queue: deque[VisionItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._queued_patches = 0

    def put(self, item: VisionItem) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")  # a shutdown ordering bug, not input
            self._queue.append(item)
            self._queued_patches += item.patches
            self._cond.notify()

    def close(self) -> None:
        """No more puts; next_batch drains what is queued without waiting, then returns []."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def next_batch(self) -> list[VisionItem]:
        """Block until a batch is due; [] once closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return []
                self._cond.wait()
            deadline = self._queue[0].queued_at + self.max_wait_s
            while not self._closed and self._queued_patches < self.token_budget:
                # Room for more: wait for them until the oldest image's deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            batch = [self._queue.popleft() for _ in range(max(1, self._patches_fitting()))]
            self._queued_patches -= sum(item.patches for item in batch)
            return batch

    def _patches_fitting(self) -> int:
        """How many queued images, from the front, fit the budget together."""
        total = 0
        for n, item in enumerate(self._queue):
            total += item.patches
            if total > self.token_budget:
                return n
        return len(self._queue)
