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
- attention metadata (slots, context lengths, block tables, and whatever the backend plans per
  bucket, such as the decode kernel's grid): the attention backend keeps it in static buffers of
  its own, through its graph hooks (models/attention.py: init_graph_buffers, prepare_for_capture,
  prepare_for_replay, graph_batch). This file knows no backend.

With `capture=False` the same static-buffer path runs without graphs, on any device (the
`nocapture` setting): tests compare it with the runner's normal path on CPU, and on a GPU it
separates graph bugs from padding or bucketing bugs.

Legend: B sequences in the step, Bp its bucket (padded batch), W block-table width, S block
size, V vocab, Hq/Hkv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import AttentionBatch
from models.forward_context import ForwardContext, Kernels


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


class DecodeGraphRunner:
    """Static input buffers, one captured graph per bucket, and the step that fills and replays them."""

    def __init__(
        self,
        model: nn.Module,
        kernels: Kernels,
        *,
        max_batch: int,
        max_blocks: int,
        scratch_block: int,
        mrope: bool,
        capture: bool,
    ) -> None:
        self.model = model
        self.kernels = kernels
        self.sizes = bucket_sizes(max_batch)
        self.max_blocks = max_blocks
        self.mrope = mrope
        device = kernels.attn.kv_cache.data.device
        self.device = device
        # The model's inputs in one int64 block, so they are one copy: token ids, then positions
        # (3 rows for M-RoPE, else 1). The host side is pinned on CUDA so the copy is asynchronous.
        self._pos_rows = 3 if mrope else 1
        rows = 1 + self._pos_rows
        pin = device.type == "cuda"
        self._host = torch.zeros(rows, max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._inputs = torch.zeros(rows, max_batch, dtype=torch.int64, device=device)
        kernels.attn.init_graph_buffers(max_batch, max_blocks, scratch_block)  # padding rows: token 0 at position 0
        # Host buffers (ours and the backend's) are free again once the step's copies are done.
        self._copied = torch.cuda.Event() if pin else None
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
            self._copied.synchronize()  # the previous step's copies have read the host buffers
        host = self._host_np
        host[0, :batch] = step.token_ids
        host[1:, :batch] = step.positions
        host[:, batch:size] = 0
        self._inputs.copy_(self._host, non_blocking=True)  # the whole pinned block: one async copy
        attn = self.kernels.attn
        attn.prepare_for_replay(size, step.slots, step.context_lens, step.block_tables)
        if self._copied is not None:
            self._copied.record()
        if size in self.graphs:
            self.graphs[size].replay()
            logits = self._graph_logits[size]
        else:
            logits = self._forward(size, attn.graph_batch(size, step.context_lens + [1] * (size - batch)))
        return logits[:batch]

    def _forward(self, size: int, attn_batch: AttentionBatch) -> torch.Tensor:
        """The graph body over the first `size` rows of the static buffers: -> logits [Bp, V]."""
        ids = self._inputs[0, :size]
        positions = self._inputs[1:4, :size] if self.mrope else self._inputs[1, :size]
        ctx = ForwardContext(self.kernels, attn_batch, positions, graph_bucket=size)
        return self.model.compute_logits(self.model(ids, ctx))

    @torch.no_grad()
    def _capture(self) -> None:
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest one left.
        for size in reversed(self.sizes):
            self._inputs.zero_()  # padding rows only: no real KV is touched
            attn_batch = self.kernels.attn.prepare_for_capture(size)
            # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels, the
            # allocator settles (torch's recipe: on a side stream).
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward(size, attn_batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_logits[size] = self._forward(size, attn_batch)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
