"""`TritonAttentionBackend`: models/attention.py's AttentionBackend on GPU kernels.

Same contract and results as TorchAttentionBackend, with the work routed by batch kind:
  decode   (every sequence one new token)  -> paged decode kernel, one launch for all sequences
  prefill  (nothing cached before the step) -> one varlen flash-attention call over the new keys
  mixed    (chunked prefill, or prefill beside decodes) -> the paged contexts gathered, then one
           varlen flash-attention call (prefill_attention.py)
q/k norm, rotary and the KV-cache store are one kernel (fused_ops.qk_norm_rope). `prepare` builds
the device tensors its kind needs (context lengths, cu_seqlens, gather slots) once per step.

Legend: T tokens, B sequences, Hq/Hkv heads, D head dim, C context tokens of all sequences.
"""

from __future__ import annotations

import torch

from models.attention import AttentionBackend, AttentionBatch
from models.kernels.availability import num_sms
from models.kernels.fused_ops import qk_norm_rope
from models.kernels.paged_attention import choose_split_len, paged_decode_attention
from models.kernels.prefill_attention import (
    context_slots,
    cumulative_lens,
    gather_context,
    varlen_causal_attention,
)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    graph_capturable = True  # decode reads only device tensors and a host bound fixed per bucket

    qk_norm_rope = staticmethod(qk_norm_rope)

    def prepare(
        self,
        query_lens: list[int],
        context_lens: list[int],
        slot_mapping: torch.Tensor | None = None,
        block_tables: torch.Tensor | None = None,
    ) -> AttentionBatch:
        batch = super().prepare(query_lens, context_lens, slot_mapping, block_tables)
        device = self.device
        if batch.kind == "decode":
            batch.device_context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
            return batch
        batch.cu_seqlens = cumulative_lens(batch.query_lens, batch.context_lens, device)
        if batch.kind == "mixed":
            batch.context_slots = context_slots(block_tables, batch.context_lens, self.kv_cache.block_size)
        return batch

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotated, already in the cache) -> [T, Hq, D]."""
        if batch.kind == "decode":
            k_cache, v_cache = self.kv_cache.data[layer_idx]  # each [N, S, Hkv, D]
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                batch.block_tables,
                batch.device_context_lens,
                max_context=batch.max_context,
                split_len=batch.split_len,
                balance_splits=batch.balance_splits,
            )
        if batch.kind == "prefill":  # the new keys are the whole contexts
            return varlen_causal_attention(q, k, v, batch.query_lens, batch.query_lens, batch.cu_seqlens)
        keys, values = gather_context(self.kv_cache, layer_idx, batch.context_slots)  # [C, Hkv, D]
        return varlen_causal_attention(q, keys, values, batch.query_lens, batch.context_lens, batch.cu_seqlens)

    def graph_batch(self, bucket: int, context_lens: list[int]) -> AttentionBatch:
        # The decode kernel's grid must be the same on every replay: the number of context splits
        # is planned once per bucket for the longest context the graphs serve, and each sequence's
        # actual context is cut evenly over them on the device (balance_splits).
        batch = super().graph_batch(bucket, context_lens)
        batch.split_len = choose_split_len(
            bucket, self.kv_cache.num_kv_heads, batch.max_context, num_sms(self.kv_cache.data.device)
        )
        batch.balance_splits = True
        return batch
