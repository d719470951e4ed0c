"""Token-to-expert alignment for grouped expert GEMMs (the idea of vLLM's moe_align_block_size).

The T*K (token, slot) pairs are sorted by expert and each expert's run is padded up to a
multiple of BLOCK_M, so every BLOCK_M-row block of the sorted list belongs to one expert and a
GEMM program can load one expert's weights for the whole block. Padding rows hold the sentinel
pair id P (= T*K) and are masked in the kernels.

Everything stays on the device with sizes known from shapes alone (no .item(), no bincount),
so the whole MoE can be captured in a CUDA graph for decode.

Legend: T tokens, K experts per token, P = T*K pairs, E experts, M = BLOCK_M,
R rows of the padded sorted list (an upper bound, a multiple of M), NB = R / M blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertAlignment:
    sorted_pair_ids: torch.Tensor  # [R] int32 pair id (t*K + k) or the sentinel P on padding rows
    block_expert_ids: torch.Tensor  # [NB] int32 expert of each block; E for blocks past the end
    num_pairs: int  # P

    @property
    def num_blocks(self) -> int:
        return self.block_expert_ids.numel()


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the padded list can need: every active expert (at most min(E, P)) wastes < M rows."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_pairs_to_experts(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """topk_ids [T, K] -> pairs sorted by expert, each expert's run padded to a multiple of M."""
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
