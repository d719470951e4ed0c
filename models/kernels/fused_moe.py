"""Fused MoE experts in Triton: two grouped GEMMs over expert-sorted (token, slot) pairs.

  align    pairs sorted by expert, each expert's run padded to BLOCK_M       (moe_align.py);
           at 1-2 tokens none: block p is pair p (PAIR_BLOCKS)
  gate_up  h[p] = SiLU(x[t] @ Wg[e]^T) * (x[t] @ Wu[e]^T)   one kernel, [P, I]; the [P, 2I]
           gate/up product never reaches memory
  down     y[p] = w[p] * (h[p] @ Wd[e]^T)                    [P, H], routing weight applied
  combine  out[t] = sum_k y[t*K + k]                          [T, H] (fp32 in slot order, one
           small kernel: deterministic, unlike atomics)

Each GEMM program owns one BLOCK_M block of pairs (one expert) and one BLOCK_N column tile, so an
active expert's weight tile is read once per block: in decode that is once in total, which is
the whole cost (weight-bandwidth-bound); in prefill the blocks of one expert run side by side and
share its tiles through L2.

`triton_fused_experts` has the signature of models.moe.torch_fused_experts; TRITON_MOE (with the
fused routing kernel) is the `triton` MoE backend of models/backends.py. Without CUDA (and
outside the Triton interpreter) it calls the torch reference.

Legend: T tokens, H hidden, E experts, I expert intermediate, K experts per token, P = T*K pairs,
M/N/Kb the BLOCK_M/BLOCK_N/BLOCK_K tile sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.fused_ops import route
from models.kernels.launch import cached_launch
from models.kernels.moe_align import ExpertAlignment, align_pairs_to_experts
from models.moe import MoeBackend, torch_fused_experts

if HAS_TRITON:
    import triton
    import triton.language as tl


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # pairs per block; padding waste per active expert is < block_m rows
    block_n_up: int  # intermediate columns per gate_up program (it reads 2*block_n_up weight rows)
    block_n_down: int  # hidden columns per down program
    block_k: int
    num_warps: int
    num_stages: int


# Keyed by the largest T each row serves. Decode (T <= 256) is weight-bandwidth-bound: small M
# (16 is tl.dot's minimum) wastes no bandwidth, and narrow N tiles give enough programs to keep
# every SM streaming when only 8..128 experts are active. Prefill (T >= 1k, ~64+ pairs per expert)
# turns compute-bound, so M and N grow toward tensor-core-sized tiles. Starting points for H100;
# benchmarks/kernels_gpu.py sweeps alternatives and prints the winner per T.
MOE_CONFIGS: list[tuple[int, MoeConfig]] = [
    (8, MoeConfig(16, 16, 64, 128, 4, 4)),
    (64, MoeConfig(16, 32, 64, 128, 4, 4)),
    (256, MoeConfig(16, 64, 128, 128, 4, 3)),
    (512, MoeConfig(32, 64, 128, 128, 4, 3)),
    (2048, MoeConfig(64, 64, 128, 64, 4, 4)),
]
# Wider N tiles beyond 2k tokens: 2.07 ms against 2.42-2.57 ms at T=8192 on an H100 (the sweep
# of benchmarks/kernels_gpu.py, docs/benchmarks.md).
PREFILL_CONFIG = MoeConfig(128, 128, 256, 64, 8, 3)
# Up to this many tokens each (token, slot) pair gets its own block and no alignment runs: at one
# token the align kernel (~6 us) costs more than the experts' weight reads it would save; from
# ~4 tokens on, experts picked twice would be read twice.
PAIR_BLOCK_TOKENS = 2


# FP8 experts at a few tokens: a tile sweep on an H200 (docs/benchmarks.md, 2026-12-04) put
# wider gate_up tiles and fewer stages ahead, 24.5 against 35.9 us with the bf16 tiles at T=1.
# From 16 tokens on the sweep's best was within 3% of the bf16 tiles, which are kept.
FP8_MOE_CONFIGS: list[tuple[int, MoeConfig]] = [(8, MoeConfig(16, 32, 64, 128, 4, 3))]


def moe_config(num_tokens: int, fp8: bool = False) -> MoeConfig:
    for max_tokens, config in (FP8_MOE_CONFIGS if fp8 else []) + MOE_CONFIGS:
        if num_tokens <= max_tokens:
            return config
    return PREFILL_CONFIG


if HAS_TRITON:

    @triton.jit
    def _gate_up_silu_kernel(
        x_ptr,  # [T, H]
        w_ptr,  # [E, 2I, H], gate rows 0..I-1, up rows I..2I-1
        h_ptr,  # [P, I] out
        sorted_pair_ptr,  # [R]
        block_expert_ptr,  # [NB]
        num_pairs,
        hidden,
        inter,
        num_experts,
        stride_xt,
        stride_we,
        stride_wn,
        stride_ht,
        s_ptr,  # FP8 weights: [E, 2*ceil(I/128), ceil(H/128)] fp32 block scales (gate's grid, then up's)
        stride_se,
        stride_sn,
        up_scale_row0,  # the first grid row of the up half: ceil(I/128)
        TOP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        PAIR_BLOCKS: tl.constexpr,
        W_FP8: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if PAIR_BLOCKS:  # block p is pair p alone (row 0); block_expert_ptr is the [P] expert ids
            expert = tl.load(block_expert_ptr + pid_m).to(tl.int32)
            if expert >= num_experts:  # an expert of another rank (expert parallelism)
                return
            pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
        else:
            expert = tl.load(block_expert_ptr + pid_m)
            if expert >= num_experts:  # block past the last expert's padded run
                return
            pair = tl.load(sorted_pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [M]
        row_ok = pair < num_pairs
        token = (pair // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] intermediate columns
        col_ok = cols < inter
        ks = tl.arange(0, BLOCK_K)

        a_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :]  # [M, Kb]
        # Weights loaded as [Kb, N] tiles so tl.dot gives x @ W^T; rows are contiguous in H.
        g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]
        u_ptrs = g_ptrs + inter * stride_wn
        # FP8: each K step (BLOCK_K divides 128) lies in one 128-column block of the weight, so
        # each column of the tile has one scale per step.
        sg_ptrs = s_ptr + expert.to(tl.int64) * stride_se + (cols // 128) * stride_sn
        su_ptrs = sg_ptrs + up_scale_row0 * stride_sn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = ks < hidden - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if W_FP8:
                # Weight-only: the FP8 tile is dequantized in registers (the bf16 weights the
                # dequantized model holds, rounded alike), then accumulated in place as bf16 is.
                s_g = tl.load(sg_ptrs + k0 // 128, mask=col_ok, other=0.0)
                s_u = tl.load(su_ptrs + k0 // 128, mask=col_ok, other=0.0)
                g = (g.to(tl.float32) * s_g[None, :]).to(a.dtype)
                u = (u.to(tl.float32) * s_u[None, :]).to(a.dtype)
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up, in fp32
        h_ptrs = h_ptr + pair.to(tl.int64)[:, None] * stride_ht + cols[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _down_weighted_kernel(
        h_ptr,  # [P, I]
        w_ptr,  # [E, H, I]
        y_ptr,  # [P, H] out
        sorted_pair_ptr,  # [R]
        block_expert_ptr,  # [NB]
        pair_weight_ptr,  # [P] routing weight of each pair
        num_pairs,
        hidden,
        inter,
        num_experts,
        stride_ht,
        stride_we,
        stride_wn,
        stride_yt,
        s_ptr,  # FP8 weights: [E, ceil(H/128), ceil(I/128)] fp32 block scales
        stride_se,
        stride_sn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        PAIR_BLOCKS: tl.constexpr,
        W_FP8: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if PAIR_BLOCKS:  # as in the gate_up kernel
            expert = tl.load(block_expert_ptr + pid_m).to(tl.int32)
            if expert >= num_experts:
                return
            pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs).to(tl.int64)
        else:
            expert = tl.load(block_expert_ptr + pid_m)
            if expert >= num_experts:
                return
            pair = tl.load(sorted_pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [M]
        row_ok = pair < num_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] hidden columns
        col_ok = cols < hidden
        ks = tl.arange(0, BLOCK_K)

        a_ptrs = h_ptr + pair[:, None] * stride_ht + ks[None, :]  # [M, Kb]
        b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [Kb, N]
        s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + (cols // 128) * stride_sn  # as in gate_up
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = ks < inter - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if W_FP8:  # as in gate_up
                scale = tl.load(s_ptrs + k0 // 128, mask=col_ok, other=0.0)
                b = (b.to(tl.float32) * scale[None, :]).to(a.dtype)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        weight = tl.load(pair_weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        y_ptrs = y_ptr + pair[:, None] * stride_yt + cols[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _combine_kernel(
        y_ptr,  # [T, K, H] weighted expert outputs
        out_ptr,  # [T, H]
        hidden,
        TOP_K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < hidden
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(TOP_K):  # fp32, in slot order, rounded once: as torch's sum
            acc += tl.load(y_ptr + (t * TOP_K + k) * hidden + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


if HAS_TRITON:  # compiled kernels reused across calls: models/kernels/launch.py
    _combine_launch = cached_launch(_combine_kernel)
    _gate_up_silu_launch = cached_launch(_gate_up_silu_kernel)
    _down_weighted_launch = cached_launch(_down_weighted_kernel)


def _combine(y: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """[P, H] -> [T, H], out[t] = sum_k y[t*K + k]. One launch where torch's reduction over a
    [T, K, H] view costs ~5 us at one token (more than the 16 KB it reads)."""
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    block = 1024
    _combine_launch((num_tokens, triton.cdiv(hidden, block)), y, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=4)
    return out


def _check_shapes(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    num_experts, two_inter, hidden = gate_up_proj.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_inter % 2:
        raise ValueError(f"x {tuple(x.shape)} does not match gate_up_proj {tuple(gate_up_proj.shape)} ([E, 2I, H])")
    if down_proj.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"down_proj {tuple(down_proj.shape)} should be [E, H, I] = {(num_experts, hidden, two_inter // 2)}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must be [T, K]"
        )
    if gate_up_proj.stride(-1) != 1 or down_proj.stride(-1) != 1:
        raise ValueError("expert weights must be contiguous in their last dimension")


def _scale_args(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """(scale pointer, its expert stride, its row stride); the weight itself stands in unread
    when the weights are not FP8."""
    if scale is None:
        return weight, 0, 0
    return scale, scale.stride(0), scale.stride(1)


def _launch_gate_up(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    align: ExpertAlignment,
    top_k: int,
    config: MoeConfig,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    num_experts, two_inter, hidden = gate_up_proj.shape
    inter = two_inter // 2
    h = torch.empty(align.num_pairs, inter, dtype=x.dtype, device=x.device)  # [P, I]
    grid = (align.num_blocks, triton.cdiv(inter, config.block_n_up))
    s, stride_se, stride_sn = _scale_args(gate_up_proj, scale)
    up_row0 = 0 if scale is None else scale.shape[1] // 2
    _gate_up_silu_launch(grid,
        x, gate_up_proj, h, align.sorted_pair_ids, align.block_expert_ids,
        align.num_pairs, hidden, inter, num_experts,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), h.stride(0),
        s, stride_se, stride_sn, up_row0,
        TOP_K=top_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n_up, BLOCK_K=config.block_k,
        EVEN_K=hidden % config.block_k == 0, PAIR_BLOCKS=align.one_pair_per_block, W_FP8=scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return h


def _launch_down(
    h: torch.Tensor,
    down_proj: torch.Tensor,
    pair_weights: torch.Tensor,
    align: ExpertAlignment,
    config: MoeConfig,
    skip_foreign: bool,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    num_experts, hidden, inter = down_proj.shape
    # Skipped pairs (experts of other ranks) are never written: they must read as zeros.
    alloc = torch.zeros if skip_foreign else torch.empty
    y = alloc(align.num_pairs, hidden, dtype=h.dtype, device=h.device)  # [P, H]
    grid = (align.num_blocks, triton.cdiv(hidden, config.block_n_down))
    s, stride_se, stride_sn = _scale_args(down_proj, scale)
    _down_weighted_launch(grid,
        h, down_proj, y, align.sorted_pair_ids, align.block_expert_ids, pair_weights,
        align.num_pairs, hidden, inter, num_experts,
        h.stride(0), down_proj.stride(0), down_proj.stride(1), y.stride(0),
        s, stride_se, stride_sn,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n_down, BLOCK_K=config.block_k,
        EVEN_K=inter % config.block_k == 0, PAIR_BLOCKS=align.one_pair_per_block, W_FP8=scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y


def triton_fused_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    skip_foreign: bool = False,
    config: MoeConfig | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [T, H] -> sum_k w[t,k] * expert_{id[t,k]}(x[t]), [T, H]; same contract as torch_fused_experts.

    With `skip_foreign`, id E (another rank's expert) is aligned as one more expert whose blocks
    both kernels skip. `config` overrides the tile table (the benchmark's sweep uses it); leave
    it None otherwise. `scales`: the weights are block-wise FP8 (models/fp8.py, 128x128 blocks)
    and these are their fp32 scale grids, (gate_up [E, 2*ceil(I/128), ceil(H/128)], gate's grid
    then up's; down [E, ceil(H/128), ceil(I/128)]); the kernels read the FP8 bytes and dequantize
    in registers (weight-only: activations stay in x's dtype).
    """
    if not use_triton(x):
        return torch_fused_experts(x, gate_up_proj, down_proj, topk_weights, topk_ids, skip_foreign, scales)
    _check_shapes(x, gate_up_proj, down_proj, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return torch.empty_like(x)
    config = config or moe_config(num_tokens, fp8=scales is not None)
    if scales is not None and 128 % config.block_k:
        raise ValueError(f"FP8 experts need BLOCK_K dividing the 128-column scale blocks, not {config.block_k}")
    x = x.contiguous()
    aligned_experts = gate_up_proj.shape[0] + skip_foreign
    align = align_pairs_to_experts(topk_ids, aligned_experts, config.block_m, pair_blocks_upto=PAIR_BLOCK_TOKENS)
    gate_up_scale, down_scale = scales if scales is not None else (None, None)
    h = _launch_gate_up(x, gate_up_proj, align, top_k, config, gate_up_scale)  # [P, I]
    pair_weights = topk_weights.reshape(-1).contiguous()
    y = _launch_down(h, down_proj, pair_weights, align, config, skip_foreign, down_scale)  # [P, H]
    return _combine(y, num_tokens, top_k)


TRITON_MOE = MoeBackend("triton", route, triton_fused_experts, graph_capturable=True)
