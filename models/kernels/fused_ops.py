"""Triton versions of models/ops.py: each of the decoder layer's small ops in one kernel.

    rms_norm / add_rms_norm   one program per row; the residual sum is stored too
    qk_norm_rope              one program per (token, head) of q and k: per-head RMSNorm, rotary,
                              and the KV-cache store of k (and of v, by programs of their own)
    route                     one program per token: softmax, top-k by repeated argmax, renorm

Every bf16 (or fp16) intermediate the reference rounds is rounded here at the same place, so
results match the references up to fp32 reduction order and transcendental ulps (tests compare
them). Without CUDA (and outside the Triton interpreter) each falls back to its reference.

Legend: T tokens, H hidden, Hq/Hkv heads, D head dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from models import ops
from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.launch import cached_launch
from models.ops import KVWrite

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,  # [T, H] residual (HAS_RESIDUAL)
        w_ptr,  # [H]
        out_ptr,  # [T, H] normalised
        sum_ptr,  # [T, H] x + residual (HAS_RESIDUAL)
        n_cols,
        eps,
        stride_x,
        stride_r,
        stride_o,
        stride_s,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded, as x + residual
            tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
        y = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _qk_norm_rope_kernel(
        q_ptr,  # [T, Hq, D] (any row stride, heads contiguous)
        k_ptr,  # [T, Hkv, D]
        v_ptr,  # [T, Hkv, D] (HAS_CACHE)
        qw_ptr,  # [D] q norm weight (HAS_NORM)
        kw_ptr,  # [D]
        cos_ptr,  # [T, D]
        sin_ptr,  # [T, D]
        q_out_ptr,  # [T, Hq, D] contiguous
        k_out_ptr,  # [T, Hkv, D] contiguous
        k_cache_ptr,  # [N*S, Hkv, D] (HAS_CACHE)
        v_cache_ptr,  # [N*S, Hkv, D]
        slots_ptr,  # [T] cache slot of each token
        num_q_heads,
        num_k_heads,
        eps,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ct,
        stride_cache_slot,
        stride_cache_head,
        HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_CACHE: tl.constexpr,
    ):
        # Programs: q heads, then k heads, then (HAS_CACHE) v heads, which only copy v to the cache.
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        dt = q_out_ptr.dtype.element_ty
        lo = tl.arange(0, HALF)
        if HAS_CACHE:
            slot = tl.load(slots_ptr + t).to(tl.int64)
            if head >= num_q_heads + num_k_heads:
                vh = head - num_q_heads - num_k_heads
                d = tl.arange(0, 2 * HALF)
                vals = tl.load(v_ptr + t * stride_vt + vh * stride_vh + d)
                tl.store(v_cache_ptr + slot * stride_cache_slot + vh * stride_cache_head + d, vals)
                return
        if head < num_q_heads:
            src = q_ptr + t * stride_qt + head * stride_qh
            dst = q_out_ptr + (t * num_q_heads + head) * (2 * HALF)
            w_ptr = qw_ptr
        else:
            src = k_ptr + t * stride_kt + (head - num_q_heads) * stride_kh
            dst = k_out_ptr + (t * num_k_heads + head - num_q_heads) * (2 * HALF)
            w_ptr = kw_ptr
        x1 = tl.load(src + lo)  # first half of the head
        x2 = tl.load(src + HALF + lo)
        if HAS_NORM:
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
            w1 = tl.load(w_ptr + lo).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + lo).to(tl.float32)
            x1 = (w1 * (a * rstd).to(dt).to(tl.float32)).to(dt)
            x2 = (w2 * (b * rstd).to(dt).to(tl.float32)).to(dt)
        c1 = tl.load(cos_ptr + t * stride_ct + lo).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + HALF + lo).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_ct + lo).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_ct + HALF + lo).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded first.
        out1 = ((a * c1).to(dt).to(tl.float32) + (-b * s1).to(dt).to(tl.float32)).to(dt)
        out2 = ((b * c2).to(dt).to(tl.float32) + (a * s2).to(dt).to(tl.float32)).to(dt)
        tl.store(dst + lo, out1)
        tl.store(dst + HALF + lo, out2)
        if HAS_CACHE:  # noqa: SIM102 - a constexpr branch, pruned at compile time; the inner one runs
            if head >= num_q_heads:
                cache = k_cache_ptr + slot * stride_cache_slot + (head - num_q_heads) * stride_cache_head
                tl.store(cache + lo, out1)
                tl.store(cache + HALF + lo, out2)

    @triton.jit
    def _route_kernel(
        logits_ptr,  # [T, E]
        weights_ptr,  # [T, K] out, logits' dtype
        ids_ptr,  # [T, K] out, int64
        num_experts,
        stride_lt,
        TOP_K: tl.constexpr,
        K_PAD: tl.constexpr,
        E_PAD: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, E_PAD)
        x = tl.load(logits_ptr + t * stride_lt + experts, mask=experts < num_experts, other=-float("inf"))
        x = x.to(tl.float32)
        e = tl.exp(x - tl.max(x, axis=0))
        p = e / tl.sum(e, axis=0)
        p = tl.where(experts < num_experts, p, -1.0)
        slots = tl.arange(0, K_PAD)
        picked = tl.zeros((K_PAD,), dtype=tl.float32)
        picked_ids = tl.zeros((K_PAD,), dtype=tl.int64)
        for j in tl.static_range(TOP_K):  # descending, lowest expert id first among equals
            best = tl.max(p, axis=0)
            idx = tl.min(tl.where(p == best, experts, E_PAD), axis=0)
            picked = tl.where(slots == j, best, picked)
            picked_ids = tl.where(slots == j, idx.to(tl.int64), picked_ids)
            p = tl.where(experts == idx, -2.0, p)
        if NORMALIZE:
            picked = picked / tl.sum(tl.where(slots < TOP_K, picked, 0.0), axis=0)
        ok = slots < TOP_K
        tl.store(weights_ptr + t * TOP_K + slots, picked.to(weights_ptr.dtype.element_ty), mask=ok)
        tl.store(ids_ptr + t * TOP_K + slots, picked_ids, mask=ok)


if HAS_TRITON:  # compiled kernels reused across calls: models/kernels/launch.py
    _rms_norm_launch = cached_launch(_rms_norm_kernel)
    _qk_norm_rope_launch = cached_launch(_qk_norm_rope_kernel)
    _route_launch = cached_launch(_route_kernel)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, H] with unit stride along H (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    rows = _rows(x)
    res = _rows(residual) if residual is not None else rows
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else out
    n_cols = rows.shape[1]
    block = triton.next_power_of_2(n_cols)
    if rows.shape[0]:
        _rms_norm_launch((rows.shape[0],),
            rows, res, weight, out, summed, n_cols, eps,
            rows.stride(0), res.stride(0), out.stride(0), summed.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(8, max(1, block // 256)),
        )  # fmt: skip
    return out.view(x.shape), summed.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not use_triton(x) or weight.dtype != x.dtype:  # mixed dtypes: the reference's promotion rules
        return ops.torch_rms_norm(x, weight, eps)
    return _norm_launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x) or not (weight.dtype == x.dtype == residual.dtype) or x.shape != residual.shape:
        return ops.torch_add_rms_norm(x, residual, weight, eps)
    return _norm_launch(x, residual, weight, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_write: KVWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    d = q.shape[-1]
    weights_ok = q_weight is None or (q_weight.dtype == k_weight.dtype == q.dtype)
    cache_ok = kv_write is None or (
        v is not None
        and v.dtype == q.dtype
        and v.stride(-1) == 1
        and kv_write.k_cache.dtype == q.dtype
        and kv_write.k_cache.stride() == kv_write.v_cache.stride()
        and kv_write.k_cache.stride(-1) == 1
    )
    if (
        not use_triton(q)
        or not weights_ok
        or not cache_ok
        or d % 2
        or d & (d - 1)
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or not (q.dtype == k.dtype == cos.dtype == sin.dtype)
        or cos.stride(-1) != 1
        or sin.stride() != cos.stride()
    ):
        return ops.torch_qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin, v, kv_write)
    t, hq, _ = q.shape
    hk = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        has_norm, has_cache = q_weight is not None, kv_write is not None
        kc, vc, slots = (kv_write.k_cache, kv_write.v_cache, kv_write.slots) if has_cache else (k, k, k)
        v = v if has_cache else k
        _qk_norm_rope_launch((t, hq + hk + (hk if has_cache else 0)),
            q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, cos, sin, q_out, k_out, kc, vc, slots,
            hq, hk, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            kc.stride(0), kc.stride(1) if has_cache else 0,
            HALF=d // 2, HAS_NORM=has_norm, HAS_CACHE=has_cache, num_warps=1,
        )  # fmt: skip
    return q_out, k_out


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t, num_experts = router_logits.shape
    if not use_triton(router_logits) or num_experts > 1024 or top_k > num_experts:
        return ops.torch_route(router_logits, top_k, normalize)
    logits = _rows(router_logits)
    weights = torch.empty((t, top_k), dtype=router_logits.dtype, device=router_logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=router_logits.device)
    if t:
        _route_launch((t,),
            logits, weights, ids, num_experts, logits.stride(0),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(num_experts),
            NORMALIZE=normalize, num_warps=1,
        )  # fmt: skip
    return weights, ids


FUSED_OPS = ops.OpsImpl(rms_norm=rms_norm, add_rms_norm=add_rms_norm)
