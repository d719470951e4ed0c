"""Paged KV-cache blocks: allocation, reference counts and prefix caching.

A sequence owns a list of block ids (its block table). A block that is full gets a key made
of its parent block's key and its own tokens, where an image token counts as
(image content key, index within the image), so two prompts share cached blocks exactly when
their text and images agree up to that point. Freed blocks keep their key and stay findable
until they are handed out again (least recently freed first), so a repeated prompt or image
reuses them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

BlockKey = tuple[Hashable, tuple[Hashable, ...]]


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and registered in the cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[BlockKey, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - have)

    def block_keys(self, tokens: Sequence[Hashable], parent_hash: int | None = None) -> list[BlockKey]:
        """Keys of the full blocks of `tokens`, each chained to the one before; `parent_hash` is the
        hash of the key of the block before `tokens[0]` (None at a sequence's start)."""
        keys: list[BlockKey] = []
        parent = parent_hash
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            key = (parent, tuple(tokens[start : start + self.block_size]))
            keys.append(key)
            parent = hash(key)
        return keys

    def match_prefix(self, keys: Sequence[BlockKey]) -> list[int]:
        """Cached blocks for the longest prefix of `keys` (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in keys:
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def take(self, cached_hits: Sequence[int], num_new: int) -> list[int] | None:
        """Reference the cached hits and allocate `num_new` fresh blocks; None if too few free."""
        reusable_free = sum(1 for b in cached_hits if self.blocks[b].ref_count == 0)
        if self.num_free - reusable_free < num_new:
            return None
        for b in cached_hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
        return list(cached_hits) + [self._allocate_one() for _ in range(num_new)]

    def _allocate_one(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:  # evict its old contents from the cache
            if self.cached.get(block.key) == block_id:
                del self.cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def register(self, block_id: int, key: BlockKey) -> None:
        """A block just became full: make it findable (unless an equal block already is)."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.key is None and key not in self.cached:
            block.key = key
            self.cached[key] = block_id

    def release(self, block_ids: Sequence[int]) -> None:
        # Tail blocks first, so the ends of prompts are evicted before their shared beginnings.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
