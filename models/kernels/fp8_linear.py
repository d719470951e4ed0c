"""A linear layer over block-wise FP8 weights (Qwen's FP8 checkpoints, models/fp8.py), in Triton.

    y[M, N] = x[M, K] @ (W8[N, K] * S[N/128, K/128])^T (+ bias)

Weight-only: the kernel reads each FP8 weight byte once and dequantizes its tile in registers
(one fp32 scale per output column per 128-wide K step; BLOCK_K divides 128) to x's dtype, the
weights the dequantized model holds, then accumulates in fp32 as a bf16 GEMM does. Decode is bandwidth-bound, so FP8 halves the bytes
the step reads; quantizing activations too (w8a8, for FP8 tensor cores) would pay off only where
the GEMM is compute-bound (long prefills), and is not done here.

Tiles by M: at decode sizes many narrow column tiles, so the few KiB a program reads keep
every SM streaming; at prefill sizes tensor-core-sized tiles. Without CUDA (outside the Triton
interpreter) `fp8_linear` dequantizes and calls F.linear.

Legend: M rows of x, K input features, N output features, S the scale grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.fp8 import dequantize
from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.launch import cached_launch

if HAS_TRITON:
    import triton
    import triton.language as tl


@dataclass(frozen=True)
class Fp8LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Keyed by the largest M each serves; benchmarks/kernels_gpu.py times them.
# From a tile sweep on an H200 (docs/benchmarks.md, 2026-12-04): at decode sizes narrow tiles,
# so a 2048-wide o_proj still spans 128 programs, with two warps and three stages.
FP8_LINEAR_CONFIGS: list[tuple[int, Fp8LinearConfig]] = [
    (16, Fp8LinearConfig(16, 16, 128, 2, 3)),
    (64, Fp8LinearConfig(64, 64, 128, 4, 4)),
    (256, Fp8LinearConfig(64, 64, 128, 4, 3)),
]
FP8_LINEAR_LARGE = Fp8LinearConfig(128, 128, 64, 8, 3)


def fp8_kernels_run_on(device: torch.device) -> bool:
    """Can the FP8 kernels run here? Triton's float8 e4m3 needs compute capability 8.9 or newer
    (Ada, Hopper and later); on older GPUs FP8 checkpoints are dequantized at load instead."""
    return HAS_TRITON and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear_config(rows: int) -> Fp8LinearConfig:
    for max_rows, config in FP8_LINEAR_CONFIGS:
        if rows <= max_rows:
            return config
    return FP8_LINEAR_LARGE


if HAS_TRITON:

    @triton.jit
    def _fp8_linear_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [N, K] float8 e4m3
        s_ptr,  # [ceil(N/128), ceil(K/128)] fp32
        bias_ptr,  # [N] or unused
        y_ptr,  # [M, N] out
        rows,
        out_features,
        in_features,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < rows
        n_ok = n < out_features
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + m.to(tl.int64)[:, None] * stride_xm + ks[None, :]  # [M, Kb]
        w_ptrs = w_ptr + n.to(tl.int64)[None, :] * stride_wn + ks[:, None]  # [Kb, N]: x @ W^T
        s_ptrs = s_ptr + (n // 128) * stride_sn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = ks < in_features - k0
                a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            # Dequantized in registers, then accumulated in place: the dequantized model's math.
            scale = tl.load(s_ptrs + k0 // 128, mask=n_ok, other=0.0)
            acc = tl.dot(a, (w.to(tl.float32) * scale[None, :]).to(a.dtype), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + m.to(tl.int64)[:, None] * stride_ym + n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _fp8_linear_launch = cached_launch(_fp8_linear_kernel)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Fp8LinearConfig | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequantized(weight [N, K], scale_inv)^T + bias -> [..., N] in x's dtype."""
    if not use_triton(x):
        return F.linear(x, dequantize(weight, scale_inv, x.dtype), bias)
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.reshape(*lead, out_features)
    config = config or fp8_linear_config(rows)
    if 128 % config.block_k:
        raise ValueError(f"FP8 weights need BLOCK_K dividing the 128-column scale blocks, not {config.block_k}")
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(out_features, config.block_n))
    _fp8_linear_launch(grid,
        x2, weight, scale_inv, bias if bias is not None else weight, y,
        rows, out_features, in_features, x2.stride(0), weight.stride(0), scale_inv.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_K=in_features % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y.reshape(*lead, out_features)
