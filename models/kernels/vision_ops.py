"""The vision tower's attention on CUDA: 2-D rotary in one kernel, all images in one flash call.

    vision_rotary          one program per (patch, q or k): every head's rotation in fp32, rounded
                           once, as the reference (`torch_vision_rotary`), which
                           is ~14 elementwise kernels over [P, heads, D] in fp32
    full_varlen_attention  bidirectional attention within each image frame: one flash-attention
                           varlen call for the whole batch instead of one SDPA call per frame, or
                           for long frames one SDPA call per run of equal frames (cuDNN's kernel)

Each falls back to its torch reference where it cannot run (CPU, fp32, no triton, torch < 2.10).

Legend: P patches, Hh heads, D head dim (72 in Qwen3-VL: halves of 36, padded to 64 in the kernel).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from models.attention import varlen_full_attention
from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.launch import cached_launch
from models.ops import apply_rotary

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _vision_rotary_kernel(
        q_ptr,  # [P, Hh, D] (any token and head stride, unit stride along D)
        k_ptr,  # [P, Hh, D]
        cos_ptr,  # [P, D] fp32
        sin_ptr,  # [P, D] fp32
        q_out_ptr,  # [P, Hh, D] contiguous
        k_out_ptr,  # [P, Hh, D] contiguous
        num_heads,
        half,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_ct,
        HEADS: tl.constexpr,
        HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, HEADS)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        col_ok = cols < half
        ok = (heads < num_heads) & col_ok
        if tl.program_id(1) == 0:
            src = q_ptr + t * stride_qt + heads * stride_qh
            dst = q_out_ptr + (t * num_heads + heads) * (2 * half)
        else:
            src = k_ptr + t * stride_kt + heads * stride_kh
            dst = k_out_ptr + (t * num_heads + heads) * (2 * half)
        a = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)  # first half of each head
        b = tl.load(src + half + cols, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + t * stride_ct + cols, mask=col_ok, other=0.0)
        c2 = tl.load(cos_ptr + t * stride_ct + half + cols, mask=col_ok, other=0.0)
        s1 = tl.load(sin_ptr + t * stride_ct + cols, mask=col_ok, other=0.0)
        s2 = tl.load(sin_ptr + t * stride_ct + half + cols, mask=col_ok, other=0.0)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = (-b, a), all in fp32, rounded once.
        dt = q_out_ptr.dtype.element_ty
        tl.store(dst + cols, (a * c1 - b * s1).to(dt), mask=ok)
        tl.store(dst + half + cols, (b * c2 + a * s2).to(dt), mask=ok)

    _vision_rotary_launch = cached_launch(_vision_rotary_kernel)


def torch_vision_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: rotate in fp32 whatever the model dtype, as transformers does."""
    qf, kf = q.float(), k.float()
    return apply_rotary(qf, cos, sin).to(q.dtype), apply_rotary(kf, cos, sin).to(k.dtype)


def vision_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [P, Hh, D] rotated by cos, sin [P, D] (fp32) -> contiguous [P, Hh, D] each."""
    p, heads, d = q.shape
    if (
        not use_triton(q)
        or d % 2
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or k.shape != q.shape
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or cos.stride(-1) != 1
        or sin.stride() != cos.stride()
    ):
        return torch_vision_rotary(q, k, cos, sin)
    q_out, k_out = (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )
    if p:
        _vision_rotary_launch((p, 2),
            q, k, cos, sin, q_out, k_out, heads, d // 2,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            HEADS=triton.next_power_of_2(heads), HALF=triton.next_power_of_2(d // 2), num_warps=4,
        )  # fmt: skip
    return q_out, k_out


@lru_cache(maxsize=1)
def _flash_varlen() -> Callable | None:
    """torch's varlen flash attention (full attention is its default mask); None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass(frozen=True)
class Segments:
    """The image frames of one vision forward (one attention segment each), and how the blocks
    attend over them, decided once per forward."""

    cu_seqlens: list[int]  # where each frame's patches start, and the total
    lengths: list[int]
    route: str  # "reference" (SDPA per frame), "flash" (one varlen call) or "runs" (SDPA per run)
    cu_device: torch.Tensor | None = None  # cu_seqlens as int32 on the device, for "flash"


# Frames at least this long on average go through SDPA, runs of equal frames batched, instead of
# the one flash varlen call: torch's flash kernels pad the head dim 72 to 96, and SDPA then picks
# cuDNN's kernel, ~1.7x faster at 4096 patches a frame (8 x 1024^2 on an H200: 1.6 ms against 2.7
# per block; benchmarks/profile_vision_gpu.py). Shorter frames are bound by the host cost of one
# SDPA call per run, where one varlen call wins (8 x 448^2: 0.15 ms against 0.50).
SDPA_MIN_MEAN_FRAME = 1024


def segments(cu_seqlens: list[int], device: torch.device, dtype: torch.dtype) -> Segments:
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or _flash_varlen() is None:
        return Segments(cu_seqlens, lengths, "reference")
    if cu_seqlens[-1] >= SDPA_MIN_MEAN_FRAME * len(lengths):
        return Segments(cu_seqlens, lengths, "runs")
    # Built once per forward: a pageable copy per block would wait for the device each time.
    cu_device = torch.tensor(cu_seqlens, dtype=torch.int32).pin_memory().to(device, non_blocking=True)
    return Segments(cu_seqlens, lengths, "flash", cu_device)


def full_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: Segments) -> torch.Tensor:
    """Bidirectional attention within each segment: [P, Hh, D] -> [P, Hh, D]."""
    if frames.route == "reference":
        return varlen_full_attention(q, k, v, frames.cu_seqlens)
    if frames.route == "runs":
        return _sdpa_by_runs(q, k, v, frames.lengths)
    longest = max(frames.lengths)
    return _flash_varlen()(q, k, v, frames.cu_device, frames.cu_device, longest, longest)


def _sdpa_by_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """One SDPA call per run of consecutive frames of equal length, the run as its batch."""
    heads, d = q.shape[1:]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    start = 0
    for n, run in itertools.groupby(lengths):
        b = len(list(run))
        end = start + b * n
        views = [t[start:end].view(b, n, heads, d).transpose(1, 2) for t in (q, k, v)]  # [B, Hh, n, D]
        out[start:end].view(b, n, heads, d).copy_(F.scaled_dot_product_attention(*views).transpose(1, 2))
        start = end
    return out
