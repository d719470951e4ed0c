"""Varlen causal attention for prefill and chunked prefill, on torch's flash-attention kernel.

Queries of sequence b are the last q_b of its c_b context positions (bottom-right causal), and
its keys are the whole context: cached blocks plus the new tokens. On CUDA (fp16/bf16) one
`torch.nn.attention.varlen.varlen_attn` call covers the whole batch: flash-attention's varlen
kernel reads GQA heads natively and aligns the causal mask bottom-right when q_b < c_b (up to
SDPA_MAX_SEQS whole prompts with nothing cached go through SDPA instead: faster there). The
paged prefix is gathered into a contiguous [C, Hkv, D] first: C*Hkv*D*4 bytes copied against
4*T*C*Hq*D flops, a few percent of the attention's time for chunks of >= 1k tokens, so a Triton
prefill kernel reading the blocks in place would gain little (docs/kernels.md; the GPU benchmark
measures both parts). Elsewhere each sequence goes through torch SDPA.

Legend: T new tokens, C context tokens of all sequences, B sequences, Hq/Hkv heads, D head dim,
S block size.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache

import torch

from models.attention import PagedKVCache, causal_attention


@lru_cache(maxsize=1)
def _flash_varlen() -> tuple[Callable, dict, bool] | None:
    """torch's varlen flash attention, its keywords for causal (and GQA where it has the flag), and
    whether it takes fewer kv heads than query heads; None on torch builds without it (< 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 spells causal `is_causal=True`; later releases `window_size=(-1, 0)`.
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    takes_gqa = "enable_gqa" in params
    if takes_gqa:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs, takes_gqa


# A prefill of a few whole prompts (nothing cached before them) goes through SDPA one prompt at a
# time instead: with is_causal and no mask SDPA takes cuDNN / flash kernels that are faster than
# varlen_attn here, and its host cost is a fraction of varlen_attn's ~100 us per call (H100,
# 1024 tokens: 53 us against 145 us per layer; docs/kernels.md). Chunks after a cached prefix
# need a bottom-right causal mask, which only varlen_attn takes without a dense mask.
SDPA_MAX_SEQS = 4


def flash_varlen_available(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None


def context_slots(block_tables: torch.Tensor, context_lens: list[int], block_size: int) -> torch.Tensor:
    """Cache slot of every context position of every sequence, laid end to end: [C] int64."""
    device = block_tables.device
    total = sum(context_lens)
    lens = torch.tensor(context_lens, device=device)
    seq_of = torch.repeat_interleave(torch.arange(len(context_lens), device=device), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=device) - starts[seq_of]  # position inside its sequence
    return block_tables[seq_of, pos // block_size].long() * block_size + pos % block_size


def gather_context(kv_cache: PagedKVCache, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at `slots` of one layer: two [C, Hkv, D] tensors."""
    layer = kv_cache.data[layer_idx]
    flat = layer.view(2, -1, *layer.shape[-2:])  # [2, N*S, Hkv, D]
    return flat[0, slots], flat[1, slots]


def varlen_causal_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] over keys/values [C, Hkv, D] (each sequence's context, end to end) -> [T, Hq, D].

    `cu_seqlens` (from `cumulative_lens`, built once per forward) saves each layer a host-to-device
    copy: from pageable memory that copy waits for the GPU to drain, serialising host and GPU."""
    if flash_varlen_available(q) and not (len(query_lens) <= SDPA_MAX_SEQS and query_lens == context_lens):
        return _flash_varlen_attention(q, keys, values, query_lens, context_lens, cu_seqlens)
    out = torch.empty_like(q)
    q_start = k_start = 0
    for q_len, ctx_len in zip(query_lens, context_lens):
        out[q_start : q_start + q_len] = causal_attention(
            q[q_start : q_start + q_len], keys[k_start : k_start + ctx_len], values[k_start : k_start + ctx_len]
        )
        q_start += q_len
        k_start += ctx_len
    return out


def cumulative_lens(
    query_lens: list[int], context_lens: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash varlen's cu_seqlens for queries and keys: [B + 1] int32 each, one copy for both."""
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    cu.append(0)
    for n in context_lens:
        cu.append(cu[-1] + n)
    both = torch.tensor(cu, dtype=torch.int32)
    if device.type == "cuda":  # pinned: an asynchronous copy (from pageable memory it would wait for the GPU)
        both = both.pin_memory().to(device, non_blocking=True)
    return both[: len(query_lens) + 1], both[len(query_lens) + 1 :]


def _flash_varlen_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    cu_seqlens: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    varlen_attn, kwargs, takes_gqa = _flash_varlen()
    group = q.shape[1] // keys.shape[1]
    if group > 1 and not takes_gqa:  # older signature: give it one kv head per query head
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    cu_q, cu_k = cu_seqlens if cu_seqlens is not None else cumulative_lens(query_lens, context_lens, q.device)
    return varlen_attn(q, keys, values, cu_q, cu_k, max(query_lens), max(context_lens), **kwargs)
