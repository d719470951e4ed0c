"""The batcher (token budget, maximum wait, arrival order) and the result cache (byte-budget
LRU, identical images in flight encoded once)."""

from __future__ import annotations

import threading
import time

import torch

from encode_server.batcher import Batcher, VisionItem
from encode_server.cache import Encoded, ResultCache, Waiter


def item(key: str, patches: int, queued_at: float | None = None) -> VisionItem:
    it = VisionItem(key, torch.zeros(patches, 4), (1, 1, patches))
    if queued_at is not None:
        it.queued_at = queued_at
    return it


def keys(batch: list[VisionItem]) -> list[str]:
    return [it.key for it in batch]


def timed(fn):
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


# ------------------------------------------------------------------------------- batcher


def test_batches_close_at_the_token_budget_in_arrival_order():
    b = Batcher(token_budget=100, max_wait_s=10)
    for key, n in [("a", 40), ("b", 40), ("c", 40), ("d", 60)]:
        b.put(item(key, n))
    batch, waited = timed(b.next_batch)
    assert keys(batch) == ["a", "b"] and waited < 1  # full: no waiting for stragglers
    assert keys(b.next_batch()) == ["c", "d"]  # exactly the budget: also full
    assert b.depth == 0


def test_an_image_larger_than_the_budget_runs_alone():
    b = Batcher(token_budget=100, max_wait_s=10)
    b.put(item("huge", 150))
    b.put(item("small", 10))
    assert keys(b.next_batch()) == ["huge"]


def test_a_lone_image_waits_at_most_max_wait():
    b = Batcher(token_budget=100, max_wait_s=0.2)
    b.put(item("a", 10))
    batch, waited = timed(b.next_batch)
    assert keys(batch) == ["a"]
    assert 0.15 <= waited < 1.0


def test_images_arriving_within_the_wait_share_the_forward():
    b = Batcher(token_budget=100, max_wait_s=1.0)
    b.put(item("a", 10))
    threading.Timer(0.1, lambda: b.put(item("b", 10))).start()
    threading.Timer(0.2, lambda: b.put(item("c", 80))).start()  # fills the budget: leave now
    batch, waited = timed(b.next_batch)
    assert keys(batch) == ["a", "b", "c"]
    assert waited < 0.8


def test_a_backlog_leaves_at_once():
    """Images that queued while the previous forward ran have waited already."""
    b = Batcher(token_budget=100, max_wait_s=5.0)
    b.put(item("a", 10, queued_at=time.monotonic() - 6))
    b.put(item("b", 10))
    batch, waited = timed(b.next_batch)
    assert keys(batch) == ["a", "b"] and waited < 0.5


def test_close_drains_without_waiting_then_ends():
    b = Batcher(token_budget=100, max_wait_s=10)
    b.put(item("a", 10))
    b.put(item("b", 10))
    b.close()
    batch, waited = timed(b.next_batch)
    assert keys(batch) == ["a", "b"] and waited < 0.5
    assert b.next_batch() == []


# --------------------------------------------------------------------------------- cache


def waiter(n: int) -> Waiter:
    return Waiter(f"req-{n}", f"key-{n}", "tcp://127.0.0.1:1", 0.0)


def encoded(rows: int, cols: int = 8) -> Encoded:
    return Encoded(f"key-{rows}", (1, 2, rows * 2), torch.randn(rows, cols))  # rows*cols*4 bytes


def test_first_asker_leads_later_askers_join_then_hit():
    cache = ResultCache(max_bytes=10_000)
    first = cache.claim("k", waiter(1))
    assert first.leader and first.hit is None
    joined = cache.claim("k", waiter(2))
    assert not joined.leader and joined.hit is None
    value = encoded(4)
    assert cache.complete("k", value) == [waiter(1), waiter(2)]  # everyone who asked is answered
    hit = cache.claim("k", waiter(3))
    assert hit.hit is value and not hit.leader


def test_failures_answer_all_waiters_and_are_not_cached():
    cache = ResultCache(max_bytes=10_000)
    cache.claim("k", waiter(1))
    cache.claim("k", waiter(2))
    assert cache.fail("k") == [waiter(1), waiter(2)]
    assert cache.claim("k", waiter(3)).leader  # a later job tries again


def test_lru_evicts_least_recently_used_within_the_byte_budget():
    cache = ResultCache(max_bytes=3 * 4 * 32)  # three results of 4x8 fp32
    for key in "abc":
        cache.claim(key, waiter(0))
        cache.complete(key, encoded(4))
    assert cache.bytes == 3 * 128 and len(cache) == 3
    cache.claim("a", waiter(0))  # a hit makes "a" recent; "b" is now the oldest
    cache.claim("d", waiter(0))
    cache.complete("d", encoded(4))
    assert cache.bytes == 3 * 128
    assert cache.claim("b", waiter(0)).leader  # evicted
    assert cache.claim("a", waiter(0)).hit is not None
    assert cache.claim("c", waiter(0)).hit is not None


def test_results_larger_than_the_budget_are_answered_but_not_kept():
    cache = ResultCache(max_bytes=100)
    cache.claim("big", waiter(1))
    assert cache.complete("big", encoded(8)) == [waiter(1)]
    assert cache.bytes == 0 and len(cache) == 0
    off = ResultCache(max_bytes=0)
    off.claim("k", waiter(1))
    off.complete("k", encoded(1))
    assert off.claim("k", waiter(2)).leader
