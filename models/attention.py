"""The attention-backend interface between the models and whoever runs them.

Models see a flat batch: T tokens from B sequences laid end to end (varlen, no padding). The
runner asks the backend to `prepare` an `AttentionBatch` once per step (every device tensor the
step's attention needs is built there, nothing later), puts it in the step's ForwardContext, and
each layer hands its q, k, v to `backend.forward`, which owns the rest: q/k norm and rotary, the
KV-cache write (fused with rotary on GPU), and the attention call.

The KV cache is paged: `[num_blocks, block_size, kv_heads, head_dim]` per layer, a block table
per sequence, and a slot (block * block_size + offset) per new token. Decode steps replayed
from CUDA graphs read their metadata from static buffers the backend owns (`init_graph_buffers`,
`prepare_for_capture`, `prepare_for_replay`, `graph_batch`), so the graph runner needs no
backend of its own.

Backends by name: `torch` (here, runs anywhere) and `triton` (models/kernels/attention_backend.py);
models/backends.py picks one.

Legend: T tokens in the batch, B sequences, Bp a graph bucket (padded batch), Hq query heads,
Hkv kv heads, D head dim, N blocks, S block size, W block-table width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from models.ops import KVWrite, torch_qk_norm_rope

BatchKind = Literal["prefill", "decode", "mixed"]  # nothing cached before / one new token each / the rest


@dataclass
class AttentionBatch:
    """One step's attention metadata: host lists for planning, device tensors for the kernels."""

    kind: BatchKind
    query_lens: list[int]  # new tokens per sequence; sums to T
    context_lens: list[int]  # cached + new tokens per sequence after this step
    slot_mapping: torch.Tensor | None = None  # [T] cache slot of each new token (None: no cache)
    block_tables: torch.Tensor | None = None  # [B, W] cache blocks of each sequence
    max_context: int = 0
    device_context_lens: torch.Tensor | None = None  # [B] on the device (decode kernel)
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None  # queries', keys' [B + 1] int32 (varlen)
    context_slots: torch.Tensor | None = None  # [C] cache slot of every context token (mixed steps)
    split_len: int | None = None  # decode kernel: context tokens per program (fixed in graphs)
    balance_splits: bool = False  # decode kernel: cut each context evenly over the fixed splits

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def batch_kind(query_lens: list[int], context_lens: list[int]) -> BatchKind:
    if context_lens == query_lens:
        return "prefill"
    return "decode" if all(n == 1 for n in query_lens) else "mixed"


class PagedKVCache:
    """Keys and values of every layer in fixed-size blocks: [L, 2, N, S, Hkv, D]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.data = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @property
    def num_kv_heads(self) -> int:
        return self.data.shape[-2]

    def target(self, layer_idx: int, slot_mapping: torch.Tensor) -> KVWrite:
        flat = self.data[layer_idx].view(2, -1, *self.data.shape[-2:])  # [2, N*S, Hkv, D]
        return KVWrite(flat[0], flat[1], slot_mapping)

    def gather(self, layer_idx: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` keys and values of one sequence: two [length, Hkv, D] tensors."""
        n_blocks = -(-length // self.block_size)
        blocks = self.data[layer_idx][:, block_table[:n_blocks]]  # [2, n, S, Hkv, D]
        kv = blocks.flatten(1, 2)[:, :length]
        return kv[0], kv[1]


class AttentionBackend:
    """Causal self-attention of every decoder layer over a flat varlen batch, with its KV cache.

    Subclasses give `attend` (and may extend `prepare` and `graph_batch`); the rest is shared.
    """

    name: ClassVar[str]
    graph_capturable: ClassVar[bool] = False  # can its decode path be captured into a CUDA graph?

    def __init__(self, kv_cache: PagedKVCache | None = None, device: torch.device | str | None = None) -> None:
        """`device`: where the step's metadata tensors go; the cache's device when there is one."""
        self.kv_cache = kv_cache
        self.device = kv_cache.data.device if kv_cache is not None else torch.device(device or "cpu")

    # ----- once per step ---------------------------------------------------------------------

    def prepare(
        self,
        query_lens: list[int],
        context_lens: list[int],
        slot_mapping: torch.Tensor | None = None,
        block_tables: torch.Tensor | None = None,
    ) -> AttentionBatch:
        """The step's metadata, every device tensor built now. Without a cache, pass no slots."""
        if (self.kv_cache is None) != (slot_mapping is None) or (slot_mapping is None) != (block_tables is None):
            raise ValueError("a KV cache needs slot_mapping and block_tables, and only a KV cache takes them")
        kind = batch_kind(query_lens, context_lens)
        if self.kv_cache is None and kind != "prefill":
            raise ValueError("context longer than the new tokens needs a KV cache")
        return AttentionBatch(
            kind,
            list(query_lens),
            list(context_lens),
            slot_mapping,
            block_tables,
            max_context=max(context_lens, default=0),
        )

    # ----- once per layer --------------------------------------------------------------------

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        norm_weights: tuple[torch.Tensor, torch.Tensor] | None,
        eps: float,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] straight from the projections -> [T, Hq, D]: per-head
        RMSNorm of q and k (when `norm_weights` are given), rotary, the KV write, attention."""
        write = None
        if self.kv_cache is not None:
            write = self.kv_cache.target(layer_idx, batch.slot_mapping)
        q_weight, k_weight = norm_weights if norm_weights is not None else (None, None)
        q, k = self.qk_norm_rope(q, k, q_weight, k_weight, eps, *rope, v=v, kv_write=write)
        return self.attend(layer_idx, q, k, v, batch)

    qk_norm_rope = staticmethod(torch_qk_norm_rope)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], rotated, new keys already in the cache -> [T, Hq, D]."""
        raise NotImplementedError

    # ----- decode steps from CUDA graphs -----------------------------------------------------

    def init_graph_buffers(self, max_batch: int, max_blocks: int, scratch_block: int) -> None:
        """Static metadata buffers for decode batches of up to `max_batch` sequences, each spanning
        at most `max_blocks` blocks. Padding rows write their key to `scratch_block`, which no
        sequence owns, and attend to that one key."""
        cache = self._cache()
        device = cache.data.device
        pin = device.type == "cuda"  # pinned: the per-step copy is asynchronous
        self._graph_max_blocks = max_blocks
        self._scratch_block = scratch_block
        self._pad = (scratch_block * cache.block_size, 1)  # (slot, context length) of a padding row
        self._host_meta = torch.zeros(2, max_batch, dtype=torch.int64, pin_memory=pin)  # slots, context lens
        self._host_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, pin_memory=pin)
        self._meta = torch.zeros(2, max_batch, dtype=torch.int64, device=device)
        self._tables = torch.zeros(max_batch, max_blocks, dtype=torch.int64, device=device)

    def prepare_for_capture(self, bucket: int) -> AttentionBatch:
        """Metadata of `bucket` padding rows, for warm-up and capture: no real KV is touched."""
        meta, tables = self._host_meta.numpy(), self._host_tables.numpy()
        meta[0, :bucket], meta[1, :bucket] = self._pad
        tables[:bucket, 0] = self._scratch_block
        self._meta.copy_(self._host_meta)
        self._tables.copy_(self._host_tables)
        return self.graph_batch(bucket, [1] * bucket)

    def prepare_for_replay(
        self, bucket: int, slots: list[int], context_lens: list[int], block_tables: list[list[int]]
    ) -> None:
        """Copy one decode step's metadata into the static buffers; rows past len(slots) pad.
        The copies are queued on the current stream from pinned host buffers (whole buffers:
        a strided slice would be staged through pageable memory): the caller makes sure the
        previous step's copies have finished before calling again."""
        batch = len(slots)
        meta, tables = self._host_meta.numpy(), self._host_tables.numpy()
        meta[0, :batch], meta[1, :batch] = slots, context_lens
        meta[0, batch:bucket], meta[1, batch:bucket] = self._pad
        for row, blocks in enumerate(block_tables):
            tables[row, : len(blocks)] = blocks
        # Later columns of a row keep stale block ids: nothing reads past a sequence's context.
        tables[batch:bucket, 0] = self._scratch_block
        self._meta.copy_(self._host_meta, non_blocking=True)
        self._tables[:bucket].copy_(self._host_tables[:bucket], non_blocking=True)  # whole rows: contiguous

    def graph_batch(self, bucket: int, context_lens: list[int]) -> AttentionBatch:
        """Graph steps' metadata over the static buffers, for a capture or an uncaptured run. The
        host lists serve backends that run eagerly (they would be frozen into a capture, so a
        capturable backend must not read them)."""
        block_size = self._cache().block_size
        return AttentionBatch(
            "decode",
            [1] * bucket,
            context_lens,
            slot_mapping=self._meta[0, :bucket],
            block_tables=self._tables[:bucket],
            max_context=self._graph_max_blocks * block_size,
            device_context_lens=self._meta[1, :bucket],
        )

    def _cache(self) -> PagedKVCache:
        if self.kv_cache is None:
            raise ValueError("decode steps need a KV cache")
        return self.kv_cache


class TorchAttentionBackend(AttentionBackend):
    """Reference backend on torch SDPA, one sequence at a time; runs anywhere torch runs.

    With a cache, new keys and values are written to their slots first, then each sequence's
    queries attend to its whole context (cached + new); query i of a sequence with q new tokens
    and context c sits at absolute position c - q + i and sees keys 0 .. c - q + i. That one rule
    covers prefill, chunked prefill and decode. Without a cache every sequence attends causally
    to its own new tokens.
    """

    name = "torch"

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for b, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
            end = start + q_len
            if self.kv_cache is None:
                keys, values = k[start:end], v[start:end]
            else:
                keys, values = self.kv_cache.gather(layer_idx, batch.block_tables[b], ctx_len)
            out[start:end] = causal_attention(q[start:end], keys, values)
            start = end
        return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Tq, Hq, D] at the last Tq positions of k/v [Tk, Hkv, D] -> [Tq, Hq, D]."""
    tq, tk = q.shape[0], k.shape[0]
    if tq == tk:
        mask, causal = None, True
    else:
        # SDPA's is_causal aligns top-left; queries here are the last tq of tk positions.
        rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        mask, causal = rows >= torch.arange(tk, device=q.device)[None, :], False
    # 4-D [1, heads, T, D]: SDPA picks its flash / memory-efficient kernels only for 4-D inputs
    # (3-D falls back to the math kernel, which materialises T×T scores).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def varlen_full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """Bidirectional attention within each segment (one image frame each): [T, H, D] -> [T, H, D]."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # 4-D, see causal_attention
        out[start:end] = F.scaled_dot_product_attention(*seg)[0].transpose(0, 1)
    return out
