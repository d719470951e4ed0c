"""`TritonAttentionBackend`: the AttentionBackend of models/attention.py on GPU kernels.

Same contract and results as TorchAttentionBackend (new keys/values are written to their cache
slots first, then query i of a sequence with q new tokens and context c attends to keys
0 .. c - q + i), with the work routed by batch kind:
  decode-only batch (every q == 1)  -> paged decode kernel, one launch for all sequences
  any prefill in the batch          -> the paged contexts gathered (unless nothing was cached
                                       before this step: then the new keys are the contexts), then
                                       one varlen flash-attention call (prefill_attention.py)
Without a cache (plain prefill) the new tokens are the whole context.

Tensors derived from the metadata (context lengths on the device, gather slots) are built at the
first layer and reused by the others while the metadata is unchanged (same object, same
context lengths, block table not written since).

Legend: T tokens, B sequences, Hq/Hkv heads, D head dim, C context tokens of all sequences.
"""

from __future__ import annotations

from typing import Callable

import torch

from models.attention import AttentionMetadata, KVWrite, PagedKVCache
from models.kernels.paged_attention import paged_decode_attention
from models.kernels.prefill_attention import (
    context_slots,
    cumulative_lens,
    flash_varlen_available,
    gather_context,
    varlen_causal_attention,
)


class TritonAttentionBackend:
    def __init__(self, kv_cache: PagedKVCache | None = None) -> None:
        self.kv_cache = kv_cache
        self._derived_for: tuple | None = None
        self._derived: dict[str, torch.Tensor] = {}

    def kv_write(self, layer_idx: int, meta: AttentionMetadata) -> KVWrite | None:
        """The model writes new keys and values itself, fused with rotary (see AttentionBackend)."""
        if self.kv_cache is None or meta.slot_mapping is None:
            return None
        return self.kv_cache.target(layer_idx, meta.slot_mapping)

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
        if self.kv_cache is None:
            if meta.context_lens != meta.query_lens:
                raise ValueError("context longer than the new tokens needs a KV cache")
            return varlen_causal_attention(q, k, v, meta.query_lens, meta.query_lens, self._cu_seqlens(meta, q))
        if meta.slot_mapping is None or meta.block_tables is None:
            raise ValueError("a KV cache needs slot_mapping and block_tables in the metadata")
        if not kv_written:
            self.kv_cache.write(layer_idx, k, v, meta.slot_mapping)
        if all(n == 1 for n in meta.query_lens):
            k_cache, v_cache = self.kv_cache.data[layer_idx]  # each [N, S, Hkv, D]
            context_lens = self._per_forward(
                meta, "context_lens", lambda: torch.tensor(meta.context_lens, dtype=torch.int32, device=q.device)
            )
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, context_lens, max_context=max(meta.context_lens)
            )
        if meta.context_lens == meta.query_lens and flash_varlen_available(q):  # nothing cached before: the new keys are all
            return varlen_causal_attention(q, k, v, meta.query_lens, meta.query_lens, self._cu_seqlens(meta, q))
        slots = self._per_forward(
            meta, "slots", lambda: context_slots(meta.block_tables, meta.context_lens, self.kv_cache.block_size)
        )
        keys, values = gather_context(self.kv_cache, layer_idx, slots)  # [C, Hkv, D]
        return varlen_causal_attention(q, keys, values, meta.query_lens, meta.context_lens, self._cu_seqlens(meta, q))

    def _cu_seqlens(self, meta: AttentionMetadata, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._per_forward(meta, "cu_seqlens", lambda: cumulative_lens(meta.query_lens, meta.context_lens, q.device))

    def _per_forward(self, meta: AttentionMetadata, name: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        # _version counts in-place writes, so an engine refilling one block-table tensor is seen.
        tables = meta.block_tables
        key = (meta, tables, tables._version if tables is not None else 0, tuple(meta.context_lens))
        old = self._derived_for
        if old is None or any(a is not b for a, b in zip(old[:2], key[:2])) or old[2:] != key[2:]:
            self._derived_for, self._derived = key, {}
        if name not in self._derived:
            self._derived[name] = build()
        return self._derived[name]
