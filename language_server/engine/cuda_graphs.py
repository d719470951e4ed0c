"""Decode steps replayed from CUDA graphs.

A decode-only step (every sequence computes one token) launches the same ~60 kernels per layer
every time; only the numbers in a few small tensors change. Launching them one by one from
Python costs more than they take to run at small batches (docs/kernels.md: the fused MoE alone
is 152 us eager against 39 us replayed at one token). So for each batch-size bucket (1, 2, 4, ...
up to max_num_seqs) the forward from token ids to logits is captured once into a CUDA graph that
reads static input buffers; a step copies its inputs into those buffers and replays the graph
of the smallest bucket that holds its batch.

What a graph fixes at capture time, and how each is handled:
- shapes: the batch is padded to its bucket. Padding rows hold token 0 at position 0, write their
  key and value to a scratch slot that no sequence owns, attend to that one slot, and their
  logits are dropped.
- block tables: [Bp, W] with W = blocks of the longest sequence the graphs serve; a step with a
  longer sequence runs eagerly instead.
- the decode kernel's grid: its number of context splits is planned per bucket for W*S context
  tokens, so the grid is the same on every replay; each sequence's actual context is cut evenly
  over those splits on the device (balance_splits), so a short context still uses them all.
  Splits with no keys weigh nothing in the merge.
- host work: attention reads context lengths from a device buffer, never from a Python list.

With `capture=False` the same static-buffer path runs without graphs, on any device: tests
compare it with the runner's normal path on CPU, and on a GPU it separates graph bugs from
padding or bucketing bugs.

Legend: B sequences in the step, Bp its bucket (padded batch), W block-table width, S block
size, V vocab, Hq/Hkv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import AttentionMetadata, KVWrite, PagedKVCache
from models.kernels.availability import num_sms
from models.kernels.paged_attention import choose_split_len, paged_decode_attention


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: 1, 2, 4, ..., max_batch."""
    return [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]


@dataclass
class DecodeStep:
    """One decode-only step's inputs on the host, one entry per sequence (B of them)."""

    token_ids: list[int]
    positions: list[list[int]]  # [3][B] (M-RoPE t, h, w) or [1][B] (1-D RoPE)
    slots: list[int]  # cache slot the new token's key/value goes to
    context_lens: list[int]  # keys per sequence, the new one included
    block_tables: list[list[int]]  # each sequence's cache blocks (at least ceil(context / S))


class StaticDecodeAttention:
    """The AttentionBackend of graph steps: one query per sequence, metadata from device buffers.

    `bind` points it at views of the static buffers before a capture or an eager run; the
    `meta` passed to `attend` is ignored (its host lists would be frozen into a graph).
    """

    def __init__(self, kv_cache: PagedKVCache) -> None:
        self.kv_cache = kv_cache

    def bind(self, slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
             max_context: int, split_len: int) -> None:
        self.slots, self.block_tables, self.context_lens = slots, block_tables, context_lens
        self.max_context, self.split_len = max_context, split_len

    def kv_write(self, layer_idx: int, meta: AttentionMetadata) -> KVWrite:
        return self.kv_cache.target(layer_idx, self.slots)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """q [Bp, Hq, D], k/v [Bp, Hkv, D] -> [Bp, Hq, D]."""
        if not kv_written:
            self.kv_cache.write(layer_idx, k, v, self.slots)
        k_cache, v_cache = self.kv_cache.data[layer_idx]
        return paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens,
                                      max_context=self.max_context, split_len=self.split_len, balance_splits=True)


class DecodeGraphRunner:
    """Static input buffers, one captured graph per bucket, and the step that fills and replays them."""

    def __init__(self, model: nn.Module, kv_cache: PagedKVCache, *, max_batch: int, max_blocks: int,
                 scratch_block: int, mrope: bool, capture: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = bucket_sizes(max_batch)
        self.max_blocks = max_blocks
        self.mrope = mrope
        device = kv_cache.data.device
        self.device = device
        # Rows of one int64 block, so a step is one copy: token ids, positions (3 or 1), slots,
        # context lengths. The host side is pinned on CUDA so the copy is asynchronous.
        self._pos_rows = 3 if mrope else 1
        rows = 3 + self._pos_rows
        pin = device.type == "cuda"
        self._host = torch.zeros(rows, max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, pin_memory=pin)
        self._host_np, self._host_tables_np = self._host.numpy(), self._host_tables.numpy()
        self._inputs = torch.zeros(rows, max_batch, dtype=torch.int64, device=device)
        self._tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, device=device)
        # Padding column: token 0 at position 0, key/value into the scratch block's first slot,
        # a context of that one key.
        self._scratch_block = scratch_block
        self._padding = [[0]] * (1 + self._pos_rows) + [[scratch_block * kv_cache.block_size], [1]]
        self._copied = torch.cuda.Event() if pin else None  # host buffers are free again after it
        self.attn = StaticDecodeAttention(kv_cache)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[int, torch.Tensor] = {}  # [Bp, V] output of each graph
        if capture:
            self._capture()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch: int) -> int:
        return next(size for size in self.sizes if size >= batch)

    def fits(self, batch: int, max_blocks: int) -> bool:
        """Can a step of `batch` sequences, the longest spanning `max_blocks` blocks, run here?"""
        return batch <= self.max_batch and max_blocks <= self.max_blocks

    @torch.no_grad()
    def run(self, step: DecodeStep) -> torch.Tensor:
        """Logits of every sequence of the step: [B, V] (a view of a buffer the next run reuses)."""
        batch = len(step.token_ids)
        size = self.bucket(batch)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffers
        self._fill_host(step, batch, size)
        self._inputs.copy_(self._host, non_blocking=True)
        self._tables[:size].copy_(self._host_tables[:size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if size in self.graphs:
            self.graphs[size].replay()
            logits = self._graph_logits[size]
        else:
            logits = self._forward(size)
        return logits[:batch]

    def _fill_host(self, step: DecodeStep, batch: int, size: int) -> None:
        host, p = self._host_np, self._pos_rows
        host[0, :batch] = step.token_ids
        host[1 : 1 + p, :batch] = step.positions
        host[1 + p, :batch] = step.slots
        host[2 + p, :batch] = step.context_lens
        host[:, batch:size] = self._padding
        tables = self._host_tables_np
        for row, blocks in enumerate(step.block_tables):
            tables[row, : len(blocks)] = blocks
        # Later columns of a row keep stale block ids: nothing reads past a sequence's context.
        tables[batch:size, 0] = self._scratch_block

    def _forward(self, size: int) -> torch.Tensor:
        """The graph body over the first `size` rows of the static buffers: -> logits [Bp, V]."""
        p = self._pos_rows
        ids = self._inputs[0, :size]
        positions = self._inputs[1:4, :size] if self.mrope else self._inputs[1, :size]
        max_context = self.max_blocks * self.kv_cache.block_size
        kv_heads = self.kv_cache.data.shape[-2]
        self.attn.bind(slots=self._inputs[1 + p, :size], block_tables=self._tables[:size],
                       context_lens=self._inputs[2 + p, :size], max_context=max_context,
                       split_len=choose_split_len(size, kv_heads, max_context, num_sms(self.device)))
        # The model only passes the metadata through to the attention, which reads the buffers.
        meta = AttentionMetadata(query_lens=[1] * size, context_lens=[], slot_mapping=self.attn.slots,
                                 block_tables=self.attn.block_tables)
        hidden = self.model(positions, self.attn, meta, input_ids=ids)  # [Bp, H]
        return self.model.compute_logits(hidden)

    @torch.no_grad()
    def _capture(self) -> None:
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest one left.
        for size in reversed(self.sizes):
            self._host_np[:, :size] = self._padding  # capture over padding rows only: no real KV is touched
            self._host_tables_np[:size, 0] = self._scratch_block
            self._inputs.copy_(self._host)
            self._tables.copy_(self._host_tables)
            # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels, the
            # allocator settles (torch's recipe: on a side stream).
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
