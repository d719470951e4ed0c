"""Continuous batching: which tokens of which requests run in the next step.

Each step fills a token budget in this order: running requests that decode (one token each),
then running requests whose prompt is still prefilling (up to chunk_size tokens each, so a long
prompt is spread over steps while others keep decoding), then waiting requests in arrival order,
admitted with their prefix-cache hits. Decodes go first so that a prompt admitted earlier (or
readmitted after a preemption) never takes the budget from requests already streaming.
When the KV cache runs out, the most recently admitted running request is preempted: its
blocks are released and it goes back to the front of the queue, to be recomputed later
(cheaply, if its blocks are still in the prefix cache).
"""

from __future__ import annotations

from collections import deque

from language_server.engine.block_manager import BlockManager
from language_server.engine.model_runner import ScheduledChunk
from language_server.engine.request import EngineRequest, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, chunk_size: int) -> None:
        self.blocks = blocks
        self.token_budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.chunk_size = chunk_size
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.preemptions = 0
        self.chunked_prefills = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, req: EngineRequest) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        for req in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed != 1):  # decodes first, stable
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            count = min(req.num_tokens - req.num_computed, self.chunk_size, budget)
            if not self._grow(req, req.num_computed + count, chunks):
                continue
            chunks.append(ScheduledChunk(req, req.num_computed, count))
            budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            count = self._admit(req, budget)
            if count == 0:
                break
            self.waiting.popleft()
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed, count))
            budget -= count
        self.chunked_prefills += sum(1 for c in chunks if c.count > 1 and not c.samples)
        return chunks

    def _admit(self, req: EngineRequest, budget: int) -> int:
        """Take prefix-cache hits and blocks for the request's first chunk; 0 if it can't start."""
        bm = self.blocks
        keys = bm.block_keys(req.cache_tokens)
        hits = bm.match_prefix(keys)
        # Always compute at least the last token: its logits give the first output token.
        if hits and len(hits) * bm.block_size >= req.num_tokens:
            hits = hits[:-1]
        cached = len(hits) * bm.block_size
        count = min(req.num_tokens - cached, self.chunk_size, budget)
        taken = bm.take(hits, bm.blocks_needed(cached + count, len(hits)))
        if taken is None:
            return 0
        req.block_ids = taken
        req.num_computed = cached
        req.num_registered_blocks = len(hits)
        req.last_block_hash = hash(keys[len(hits) - 1]) if hits else None
        req.status = Status.RUNNING
        if req.num_cached_prompt_tokens == 0 and req.num_tokens == req.num_prompt_tokens:
            # First admission (not a readmission after preemption): count it for the hit rate.
            req.num_cached_prompt_tokens = cached
            self.prefix_queried_tokens += req.num_prompt_tokens
            self.prefix_hit_tokens += cached
        return count

    def _grow(self, req: EngineRequest, num_tokens: int, chunks: list[ScheduledChunk]) -> bool:
        """Give `req` blocks for `num_tokens`, preempting newer requests if the cache is full."""
        need = self.blocks.blocks_needed(num_tokens, len(req.block_ids))
        while need > self.blocks.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            # The victim may already be in this step's batch; take it back out.
            chunks[:] = [c for c in chunks if c.request is not victim]
            if victim is req:
                return False
        if need:
            req.block_ids += self.blocks.take([], need)
        return True

    def preempt(self, req: EngineRequest) -> None:
        self.running.remove(req)
        self.blocks.release(req.block_ids)
        req.block_ids = []
        req.num_computed = 0
        req.num_registered_blocks = 0
        req.last_block_hash = None
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.preemptions += 1

    def after_step(self, chunks: list[ScheduledChunk]) -> None:
        """Advance computed counts and offer newly full blocks to the prefix cache."""
        bm = self.blocks
        for c in chunks:
            req = c.request
            req.num_computed = c.start + c.count
            full = req.num_computed // bm.block_size
            if full > req.num_registered_blocks and bm.enable_prefix_caching:
                # Only the newly filled blocks, chained to the last registered one: a long
                # sequence never rehashes its whole prefix.
                start = req.num_registered_blocks * bm.block_size
                keys = bm.block_keys(req.cache_tokens[start : full * bm.block_size], req.last_block_hash)
                for i, key in enumerate(keys):
                    bm.register(req.block_ids[req.num_registered_blocks + i], key)
                req.last_block_hash = hash(keys[-1])
                req.num_registered_blocks = full

    def finish(self, req: EngineRequest) -> None:
        if req in self.running:
            self.running.remove(req)
            self.blocks.release(req.block_ids)
            req.block_ids = []
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
