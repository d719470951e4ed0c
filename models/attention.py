"""The attention-backend interface between the models and whoever runs them.

Models see a flat batch: T tokens from B sequences laid end to end (varlen, no padding). Each
forward carries an `AttentionMetadata` that says where each sequence's new tokens sit in the
batch, how long each sequence's context is, and (with a KV cache) where new keys and values go
and which cache blocks hold the old ones. The engine fills it; models only pass it through.

The KV cache is paged from the start: `[num_blocks, block_size, kv_heads, head_dim]` per layer,
a block table per sequence, and a slot (block * block_size + offset) per new token. That is the
layout a paged decode kernel and CUDA graphs with fixed decode shapes need later, so the engine
and GPU kernels plug in without touching model code.

Legend: T tokens in the batch, B sequences, Hq query heads, Hkv kv heads, D head dim,
N blocks, S block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence; sums to T
    context_lens: list[int]  # cached + new tokens per sequence after this forward
    slot_mapping: torch.Tensor | None = None  # [T] cache slot of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] cache blocks of each sequence

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @classmethod
    def prefill(cls, seq_lens: list[int]) -> "AttentionMetadata":
        """Whole sequences, no cache: causal attention over each sequence's own tokens."""
        return cls(query_lens=list(seq_lens), context_lens=list(seq_lens))


@dataclass
class KVWrite:
    """Where a layer's new keys and values go: the caller writes them (the GPU fuses the write into
    the rotary kernel) and tells `attend` so with kv_written=True."""

    k_cache: torch.Tensor  # [N*S, Hkv, D] view of the layer's keys
    v_cache: torch.Tensor  # [N*S, Hkv, D]
    slots: torch.Tensor  # [T] slot of each new token

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_cache.index_copy_(0, self.slots, k)
        self.v_cache.index_copy_(0, self.slots, v)


class AttentionBackend(Protocol):
    """Causal self-attention for one decoder layer over a flat varlen batch.

    A backend may also offer `kv_write(layer_idx, meta) -> KVWrite | None`: then the model writes
    the new keys and values itself (fused with rotary on GPU) and passes kv_written=True."""

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (already rotated) -> [T, Hq, D]."""
        ...


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

    def target(self, layer_idx: int, slot_mapping: torch.Tensor) -> KVWrite:
        flat = self.data[layer_idx].view(2, -1, *self.data.shape[-2:])  # [2, N*S, Hkv, D]
        return KVWrite(flat[0], flat[1], slot_mapping)

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.target(layer_idx, slot_mapping).write(k, v)

    def gather(self, layer_idx: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` keys and values of one sequence: two [length, Hkv, D] tensors."""
        n_blocks = -(-length // self.block_size)
        blocks = self.data[layer_idx][:, block_table[:n_blocks]]  # [2, n, S, Hkv, D]
        kv = blocks.flatten(1, 2)[:, :length]
        return kv[0], kv[1]


class TorchAttentionBackend:
    """Reference backend on torch SDPA, one sequence at a time; runs anywhere torch runs.

    Without a cache every sequence attends causally to its own new tokens. With a cache, new
    keys/values are written to their slots first, then each sequence's queries attend to its
    whole context (cached + new); query i of a sequence with q new tokens and context c sits at
    absolute position c - q + i and sees keys 0 .. c - q + i. That one rule covers prefill,
    chunked prefill and decode.
    """

    def __init__(self, kv_cache: PagedKVCache | None = None) -> None:
        self.kv_cache = kv_cache

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:
        if self.kv_cache is not None:
            if meta.slot_mapping is None or meta.block_tables is None:
                raise ValueError("a KV cache needs slot_mapping and block_tables in the metadata")
            if not kv_written:
                self.kv_cache.write(layer_idx, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        start = 0
        for b, (q_len, ctx_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
            end = start + q_len
            if self.kv_cache is None:
                if ctx_len != q_len:
                    raise ValueError("context longer than the new tokens needs a KV cache")
                keys, values = k[start:end], v[start:end]
            else:
                keys, values = self.kv_cache.gather(layer_idx, meta.block_tables[b], ctx_len)
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
