"""Token-to-expert alignment for grouped expert GEMMs (the idea of vLLM's moe_align_block_size).

The T*K (token, slot) pairs are sorted by expert and each expert's run is padded up to a
multiple of BLOCK_M, so every BLOCK_M-row block of the sorted list belongs to one expert and a
GEMM program can load one expert's weights for the whole block. Padding rows hold the sentinel
pair id P (= T*K) and are masked in the kernels.

Everything stays on the device with sizes known from shapes alone (no .item(), no bincount),
so the whole MoE can be captured in a CUDA graph for decode. The torch version is ~25 tiny
kernels, tens of microseconds even replayed from a graph, against a ~25 us weight-read floor for
one decode token. On GPU Triton does it instead, with the same output (pairs keep their order
inside each expert's run): one program for up to SMALL_PAIRS pairs, above that three launches
over chunks of pairs (counts, start rows, scatter). The torch version remains the reference.

Legend: T tokens, K experts per token, P = T*K pairs, E experts, M = BLOCK_M,
R rows of the padded sorted list (an upper bound, a multiple of M), NB = R / M blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.launch import cached_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

SMALL_PAIRS = 256  # one program loops over the pairs twice; above this the chunked version (3 launches) wins


@dataclass
class ExpertAlignment:
    sorted_pair_ids: torch.Tensor  # [R] int32 pair id (t*K + k) or the sentinel P on padding rows
    block_expert_ids: torch.Tensor  # [NB] int32 expert of each block; E for blocks past the end
    num_pairs: int  # P
    one_pair_per_block: bool = False  # block p is pair p alone; block_expert_ids is then [P] topk ids

    @property
    def num_blocks(self) -> int:
        return self.block_expert_ids.numel()


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the padded list can need: every active expert (at most min(E, P)) wastes < M rows."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_pairs_to_experts(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, pair_blocks_upto: int = 0
) -> ExpertAlignment:
    """topk_ids [T, K] -> pairs sorted by expert, each expert's run padded to a multiple of M.

    For at most `pair_blocks_upto` tokens nothing is sorted: each pair is its own block (the
    kernels' PAIR_BLOCKS mode), which at one or two decode tokens costs no kernel at all."""
    if topk_ids.shape[0] <= pair_blocks_upto:
        flat = topk_ids.reshape(-1)
        return ExpertAlignment(flat, flat, flat.numel(), one_pair_per_block=True)
    if use_triton(topk_ids):
        if topk_ids.numel() <= SMALL_PAIRS:
            return _align_one_program(topk_ids, num_experts, block_m)
        return _align_chunked(topk_ids, num_experts, block_m)
    return _align_torch(topk_ids, num_experts, block_m)


def _align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [P]
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [E] end row of each expert's padded run
    # Start of each expert's run, unpadded (in the sorted pairs) and padded (in the output rows).
    run_start = torch.cumsum(counts, 0) - counts
    padded_start = padded_end - padded

    order = torch.argsort(flat, stable=True)  # [P] pair ids grouped by expert
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=device) - run_start[expert_of]  # position inside its run
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.full((rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[padded_start[expert_of] + rank] = order.to(torch.int32)

    block_starts = torch.arange(0, rows, block_m, device=device)  # [NB]
    # The block starting at row r belongs to the first expert whose padded run ends after r;
    # blocks past the last run get E, which the kernels skip.
    block_expert_ids = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return ExpertAlignment(sorted_pair_ids, block_expert_ids, num_pairs)


if HAS_TRITON:

    @triton.jit
    def _align_kernel(
        ids_ptr,  # [P] expert of each pair
        sorted_pair_ptr,  # [R] out
        block_expert_ptr,  # [NB] out
        num_pairs,
        num_experts,
        num_rows,
        BLOCK_M: tl.constexpr,
        E_PAD: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        experts = tl.arange(0, E_PAD)
        lanes = tl.arange(0, CHUNK)
        # Pass 1: pairs per expert, via a [CHUNK, E] one-hot (no atomics: deterministic).
        counts = tl.zeros((E_PAD,), dtype=tl.int32)
        for c0 in range(0, num_pairs, CHUNK):
            ids = tl.load(ids_ptr + c0 + lanes, mask=c0 + lanes < num_pairs, other=E_PAD)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)  # [E]
        padded_start = padded_end - padded
        # Expert of each block: the first whose padded run ends after the block's first row.
        for b0 in range(0, num_rows // BLOCK_M, CHUNK):
            starts = (b0 + lanes) * BLOCK_M
            ended = tl.sum((padded_end[None, :] <= starts[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + b0 + lanes, tl.minimum(ended, num_experts), mask=starts < num_rows)
        for r0 in range(0, num_rows, CHUNK):
            tl.store(sorted_pair_ptr + r0 + lanes, num_pairs, mask=r0 + lanes < num_rows)
        tl.debug_barrier()  # the sentinel fill lands before the scatter overwrites real rows
        # Pass 2: each pair's row = its expert's padded start + pairs of that expert before it.
        seen = tl.zeros((E_PAD,), dtype=tl.int32)
        for c0 in range(0, num_pairs, CHUNK):
            ok = c0 + lanes < num_pairs
            ids = tl.load(ids_ptr + c0 + lanes, mask=ok, other=E_PAD)
            onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E]
            before_in_chunk = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
            base = tl.sum(onehot * (padded_start + seen)[None, :], axis=1)
            tl.store(sorted_pair_ptr + base + before_in_chunk, c0 + lanes, mask=ok)
            seen += tl.sum(onehot, axis=0)


if HAS_TRITON:

    @triton.jit
    def _chunk_counts_kernel(
        ids_ptr,  # [P] expert of each pair
        counts_ptr,  # [C, E_PAD] out: pairs per expert in each chunk of CHUNK pairs
        num_pairs,
        E_PAD: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        lanes = chunk * CHUNK + tl.arange(0, CHUNK)
        experts = tl.arange(0, E_PAD)
        ids = tl.load(ids_ptr + lanes, mask=lanes < num_pairs, other=E_PAD)
        counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        tl.store(counts_ptr + chunk * E_PAD + experts, counts)

    @triton.jit
    def _chunk_offsets_kernel(
        counts_ptr,  # [C, E_PAD] in: per-chunk counts; out: row where each chunk's run of each expert starts
        block_expert_ptr,  # [NB] out
        sorted_pair_ptr,  # [R] out: filled with the sentinel
        num_chunks,
        num_pairs,
        num_experts,
        num_rows,
        BLOCK_M: tl.constexpr,
        E_PAD: tl.constexpr,
        LANES: tl.constexpr,
    ):
        experts = tl.arange(0, E_PAD)
        total = tl.zeros((E_PAD,), dtype=tl.int32)
        for c in range(0, num_chunks):
            total += tl.load(counts_ptr + c * E_PAD + experts)
        padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)
        running = padded_end - padded  # padded start of each expert's run
        for c in range(0, num_chunks):  # exclusive scan over chunks, per expert
            here = tl.load(counts_ptr + c * E_PAD + experts)
            tl.store(counts_ptr + c * E_PAD + experts, running)
            running += here
        lanes = tl.arange(0, LANES)
        for b0 in range(0, num_rows // BLOCK_M, LANES):
            starts = (b0 + lanes) * BLOCK_M
            ended = tl.sum((padded_end[None, :] <= starts[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + b0 + lanes, tl.minimum(ended, num_experts), mask=starts < num_rows)
        for r0 in range(0, num_rows, LANES):
            tl.store(sorted_pair_ptr + r0 + lanes, num_pairs, mask=r0 + lanes < num_rows)

    @triton.jit
    def _chunk_scatter_kernel(
        ids_ptr,  # [P]
        offsets_ptr,  # [C, E_PAD] from _chunk_offsets_kernel
        sorted_pair_ptr,  # [R] out
        num_pairs,
        E_PAD: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        lanes = chunk * CHUNK + tl.arange(0, CHUNK)
        ok = lanes < num_pairs
        experts = tl.arange(0, E_PAD)
        ids = tl.load(ids_ptr + lanes, mask=ok, other=E_PAD)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E]
        before_in_chunk = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
        base = tl.sum(onehot * tl.load(offsets_ptr + chunk * E_PAD + experts)[None, :], axis=1)
        tl.store(sorted_pair_ptr + base + before_in_chunk, lanes, mask=ok)


if HAS_TRITON:  # compiled kernels reused across calls: models/kernels/launch.py
    _align_launch = cached_launch(_align_kernel)
    _chunk_counts_launch = cached_launch(_chunk_counts_kernel)
    _chunk_offsets_launch = cached_launch(_chunk_offsets_kernel)
    _chunk_scatter_launch = cached_launch(_chunk_scatter_kernel)


def _align_one_program(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    num_pairs = topk_ids.numel()
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.empty(rows, dtype=torch.int32, device=topk_ids.device)
    block_expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=topk_ids.device)
    _align_launch((1,),
        topk_ids.reshape(-1), sorted_pair_ids, block_expert_ids, num_pairs, num_experts, rows,
        BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts), CHUNK=64, num_warps=4,
    )  # fmt: skip
    return ExpertAlignment(sorted_pair_ids, block_expert_ids, num_pairs)


ALIGN_CHUNK = 256  # pairs per program of the chunked alignment


def _align_chunked(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """The same result as _align_torch in three launches: per-chunk counts (one program per
    ALIGN_CHUNK pairs), one program turning them into each chunk's start row per expert (and the
    block experts and the sentinel fill), then the scatter, in order within every expert's run.
    Replaces ~22 torch ops (~120 us of GPU time and ~300 us of host time at 8k pairs)."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    e_pad = triton.next_power_of_2(num_experts)
    chunks = triton.cdiv(num_pairs, ALIGN_CHUNK)
    device = topk_ids.device
    counts = torch.empty(chunks, e_pad, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(rows, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    _chunk_counts_launch((chunks,), flat, counts, num_pairs, E_PAD=e_pad, CHUNK=ALIGN_CHUNK, num_warps=4)
    _chunk_offsets_launch(
        (1,),
        counts,
        block_expert_ids,
        sorted_pair_ids,
        chunks,
        num_pairs,
        num_experts,
        rows,
        BLOCK_M=block_m,
        E_PAD=e_pad,
        LANES=256,
        num_warps=4,
    )
    _chunk_scatter_launch(
        (chunks,), flat, counts, sorted_pair_ids, num_pairs, E_PAD=e_pad, CHUNK=ALIGN_CHUNK, num_warps=4
    )
    return ExpertAlignment(sorted_pair_ids, block_expert_ids, num_pairs)
