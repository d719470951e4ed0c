"""Paged decode attention in Triton: one query per sequence against its paged KV cache.

Each program takes one sequence, one kv head and one slice of the context, and computes all
Hq/Hkv query heads that share that kv head at once (GQA), so every key and value is read from
memory once per kv head, never once per query head. Softmax is online (running max and sum in
fp32). When B*Hkv programs cannot fill the GPU (few or long sequences), the context is split
across programs (flash-decoding) and a second small kernel merges the partial results by their
log-sum-exp.

Decode is bandwidth-bound: the floor is the KV bytes of all contexts read once.

`paged_decode_attention` falls back to a torch reference without CUDA (and outside the Triton
interpreter).

Legend: B sequences, Hq query heads, Hkv kv heads, G = Hq/Hkv query heads per kv head,
D head dim, N cache blocks, S block size, NS context splits, BN keys per inner step.
"""

from __future__ import annotations

import math

import torch

from models.attention import causal_attention
from models.kernels.availability import HAS_TRITON, num_sms, use_triton
from models.kernels.launch import cached_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK_N = 64  # keys per inner step: a 64 x 128 bf16 K tile is 16 KB
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (q load, partial write) dominates

if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,  # [B, Hq, D]
        k_cache_ptr,  # [N, S, Hkv, D]
        v_cache_ptr,  # [N, S, Hkv, D]
        block_tables_ptr,  # [B, max_blocks] int32 or int64
        context_lens_ptr,  # [B] int32 or int64
        out_ptr,  # [B, Hq, D] (one split) or partial [B, Hq, NS, D] fp32
        lse_ptr,  # [B, Hq, NS] fp32 log2-sum-exp of each split (split mode only)
        scale_log2,  # softmax scale * log2(e): exp2 is the fast path
        split_len,  # context tokens per split, a multiple of BLOCK_N; 0: each sequence's own share
        stride_qb,
        stride_qh,
        stride_cn,
        stride_cs,
        stride_ch,
        stride_vn,
        stride_vs,
        stride_vh,
        stride_bt,
        stride_ob,
        stride_oh,
        stride_os,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,  # >= 16: tl.dot's smallest M
        HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(context_lens_ptr + seq).to(tl.int32)  # int32 or int64 lengths: one type below
        if split_len == 0:  # balanced: this sequence's own context cut into num_programs(2) slices
            split_len = tl.cdiv(tl.cdiv(ctx, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, ctx)

        g = tl.arange(0, GROUP_PAD)
        head_ok = g < GROUP
        q_head = kv_head * GROUP + g  # [G]
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + seq * stride_qb + q_head[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0
        )

        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)  # [BN]
            pos_ok = pos < end
            block = tl.load(block_tables_ptr + seq * stride_bt + pos // PAGE, mask=pos_ok, other=0).to(tl.int64)
            slot_in_block = pos % PAGE
            k_rows = block * stride_cn + slot_in_block * stride_cs + kv_head * stride_ch
            k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :], mask=pos_ok[:, None], other=0.0)  # [BN, D]
            s = tl.dot(q, tl.trans(k)) * scale_log2  # [G, BN]
            s = tl.where(pos_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            denom = denom * alpha + tl.sum(p, axis=1)
            v_rows = block * stride_vn + slot_in_block * stride_vs + kv_head * stride_vh
            v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :], mask=pos_ok[:, None], other=0.0)  # [BN, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        if SPLIT:
            # A split past the end of a short sequence saw no keys: weight 0 in the merge.
            has_keys = denom > 0
            out = tl.where(has_keys[:, None], acc / tl.where(has_keys, denom, 1.0)[:, None], 0.0)
            lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, denom, 1.0)), float("-inf"))
            row = seq * stride_ob + q_head * stride_oh + split * stride_os  # [G]
            tl.store(out_ptr + row[:, None] + d[None, :], out, mask=head_ok[:, None])
            # lse is a contiguous [B, Hq, NS] with Hq = Hkv * GROUP.
            lse_idx = (seq * tl.num_programs(1) * GROUP + q_head) * tl.num_programs(2) + split
            tl.store(lse_ptr + lse_idx, lse, mask=head_ok)
        else:
            out = acc / denom[:, None]
            row = seq * stride_ob + q_head * stride_oh
            tl.store(out_ptr + row[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

    @triton.jit
    def _merge_splits_kernel(
        partial_ptr,  # [B, Hq, NS, D] fp32
        lse_ptr,  # [B, Hq, NS] fp32
        out_ptr,  # [B, Hq, D]
        num_splits,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        SPLITS_PAD: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        row = seq * tl.num_programs(1) + head  # index into [B*Hq]
        s = tl.arange(0, SPLITS_PAD)
        s_ok = s < num_splits
        lse = tl.load(lse_ptr + row * num_splits + s, mask=s_ok, other=float("-inf"))  # [NS]
        w = tl.exp2(lse - tl.max(lse, axis=0))  # splits without keys have lse -inf: weight 0
        d = tl.arange(0, HEAD_DIM)
        part = tl.load(
            partial_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0
        )
        out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


if HAS_TRITON:  # compiled kernels reused across calls: models/kernels/launch.py
    _paged_decode_launch = cached_launch(_paged_decode_kernel)
    _merge_splits_launch = cached_launch(_merge_splits_kernel)


def choose_split_len(batch: int, kv_heads: int, max_context: int, sms: int) -> int:
    """Context tokens per program: whole contexts when B*Hkv programs already fill ~2 waves of
    SMs, otherwise slices (>= MIN_SPLIT_TOKENS) so that about that many programs exist."""
    programs = batch * kv_heads
    splits = max(1, min(-(-2 * sms // programs), -(-max_context // MIN_SPLIT_TOKENS)))
    split_len = -(-max_context // splits)
    return -(-split_len // BLOCK_N) * BLOCK_N


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context: int | None = None,
    split_len: int | None = None,
    balance_splits: bool = False,
) -> torch.Tensor:
    """q [B, Hq, D] (the last position of each sequence) over k/v_cache [N, S, Hkv, D] -> [B, Hq, D].

    block_tables [B, max_blocks] and context_lens [B] (keys per sequence, >= 1, the new token's
    included) are integer tensors on q's device. `max_context` (a host int) saves a device sync
    when given; `split_len` overrides the split choice (tests use it to force flash-decoding).

    `balance_splits` keeps the number of splits that max_context and split_len give, but cuts
    each sequence's actual context evenly over them. CUDA graphs plan for the longest context
    they serve (thousands of tokens) while most steps are far shorter: with fixed slices, a
    512-token context would run in 2 of 33 slices, one 256-key loop each; balanced, in 8 slices
    of one 64-key step.
    """
    if not use_triton(q):
        return _torch_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    batch, q_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if q_heads % kv_heads or head_dim & (head_dim - 1) or q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("need Hq % Hkv == 0, a power-of-two head_dim and contiguous head vectors")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = q_heads // kv_heads
    if max_context is None:
        max_context = int(context_lens.max())
    if split_len is None:
        split_len = choose_split_len(batch, kv_heads, max_context, num_sms(q.device))
    num_splits = -(-max_context // split_len)
    common = dict(
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        PAGE=page,
        BLOCK_N=BLOCK_N,
        num_warps=4,
        num_stages=2,
    )
    scale_log2 = math.log2(math.e) / math.sqrt(head_dim)
    cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
    if num_splits == 1:
        _paged_decode_launch((batch, kv_heads, 1),
            q, k_cache, v_cache, block_tables, context_lens, out, out, scale_log2, split_len,
            q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0),
            out.stride(0), out.stride(1), 0, SPLIT=False, **common,
        )  # fmt: skip
        return out
    partial = torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_launch((batch, kv_heads, num_splits),
        q, k_cache, v_cache, block_tables, context_lens, partial, lse, scale_log2, 0 if balance_splits else split_len,
        q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2), SPLIT=True, **common,
    )  # fmt: skip
    _merge_splits_launch((batch, q_heads),
        partial, lse, out, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
    )  # fmt: skip
    return out


def _torch_paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """Reference: gather each sequence's keys/values from its blocks, then SDPA (one at a time)."""
    page = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, ctx in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-ctx // page)].long()
        keys = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        values = v_cache[blocks].flatten(0, 1)[:ctx]
        out[b] = causal_attention(q[b : b + 1], keys, values)[0]
    return out
