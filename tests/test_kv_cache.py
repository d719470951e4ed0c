"""Incremental decoding through the paged KV cache equals full recomputation.

Runs the language side (Qwen3MoeForCausalLMWithDeepStack) the way an engine will: chunked
prefill that cuts through an image, two sequences at different stages in one flat batch, and
scattered (non-contiguous) cache blocks.
"""

from __future__ import annotations

import pytest
import torch

from models.attention import PagedKVCache
from models.backends import torch_kernels
from models.forward_context import forward_context, prefill_context
from models.loader import load_model
from models.mrope import mrope_positions

TOL = 1e-4
BLOCK = 4


@pytest.fixture(scope="module")
def parts(vl_ckpt):
    language = load_model(vl_ckpt, part="language", dtype=torch.float32)
    vision = load_model(vl_ckpt, part="vision", dtype=torch.float32).model
    return language.model, vision, language.config


def build_sequence(vision, cfg, text_before, grid, text_after, seed):
    """Token ids [T], image mask [T], vision rows [N, H·(1+k)] (or None) and M-RoPE positions of one sequence."""
    img = cfg.image_token_id
    n_img = grid[0] * grid[1] * grid[2] // 4 if grid else 0
    ids = (
        text_before + [cfg.vision_start_token_id] + [img] * n_img + [cfg.vision_end_token_id] + text_after
        if grid
        else text_before + text_after
    )
    ids_t = torch.tensor(ids)
    rows = None
    if grid:
        gen = torch.Generator().manual_seed(seed)
        rows = vision(torch.randn(grid[0] * grid[1] * grid[2], 1536, generator=gen), [grid])
    positions, _ = mrope_positions(ids, [grid] if grid else [], img, 2)
    return ids_t, ids_t == img, rows, positions


@torch.no_grad()
def test_chunked_and_batched_decode_equals_full_recompute(parts):
    lang, vision, cfg = parts
    seqs = [
        build_sequence(vision, cfg, [11, 12, 13], (1, 4, 8), [14, 15, 16, 17, 18, 19, 20, 21], seed=0),
        build_sequence(vision, cfg, [30, 31, 32, 33, 34, 35, 36, 37, 38], None, [40, 41, 42, 43], seed=1),
    ]
    full = []
    for ids, mask, rows, pos in seqs:
        ctx = prefill_context(torch_kernels(), [len(ids)], positions=pos)
        if rows is not None:
            ctx.image_mask, ctx.image_rows = mask, rows
        full.append(lang.compute_logits(lang(ids, ctx)))

    text = cfg.text
    cache = PagedKVCache(
        text.num_hidden_layers, 24, BLOCK, text.num_key_value_heads, text.head_dim, torch.float32, "cpu"
    )
    kernels = torch_kernels(cache)
    # Scattered, interleaved blocks: sequence 0 gets odd blocks backwards, sequence 1 even ones.
    tables = torch.tensor([[23, 21, 19, 17, 15, 13, 11, 9], [0, 2, 4, 6, 8, 10, 12, 14]])

    def slot(seq, index):
        return int(tables[seq, index // BLOCK]) * BLOCK + index % BLOCK

    # Each step: (sequence, first token, count) parts in one flat batch. Sequence 0's first chunk
    # ends inside its image; later steps decode one token of 0 while 1 prefills in chunks.
    len0, len1 = len(seqs[0][0]), len(seqs[1][0])
    steps = [[(0, 0, 7)], [(0, 7, len0 - 7 - 5), (1, 0, 5)]]
    index0, index1 = len0 - 5, 5
    while index0 < len0 or index1 < len1:
        step = []
        if index0 < len0:
            step.append((0, index0, 1))
            index0 += 1
        if index1 < len1:
            count = min(2, len1 - index1)
            step.append((1, index1, count))
            index1 += count
        steps.append(step)

    for step in steps:
        ids = torch.cat([seqs[s][0][a : a + n] for s, a, n in step])
        mask = torch.cat([seqs[s][1][a : a + n] for s, a, n in step])
        # Each part's rows: those of the image positions it covers, in batch order.
        rows = [
            seqs[s][2][int(seqs[s][1][:a].sum()) : int(seqs[s][1][: a + n].sum())]
            for s, a, n in step
            if seqs[s][2] is not None
        ]
        positions = torch.cat([seqs[s][3][:, a : a + n] for s, a, n in step], dim=1)
        ctx = forward_context(
            kernels,
            positions,
            query_lens=[n for _, _, n in step],
            context_lens=[a + n for _, a, n in step],
            slot_mapping=torch.tensor([slot(s, i) for s, a, n in step for i in range(a, a + n)]),
            block_tables=tables[[s for s, _, _ in step]],
            image_mask=mask if mask.any() else None,
            image_rows=torch.cat(rows) if mask.any() else None,
        )
        logits = lang.compute_logits(lang(ids, ctx))
        for (s, a, n), part in zip(step, logits.split([n for _, _, n in step])):
            assert (part - full[s][a : a + n]).abs().max().item() <= TOL, (s, a, n)
    assert index0 == len0 and index1 == len1


@torch.no_grad()
def test_cache_without_slots_is_refused(parts):
    lang, _, cfg = parts
    text = cfg.text
    cache = PagedKVCache(
        text.num_hidden_layers, 4, BLOCK, text.num_key_value_heads, text.head_dim, torch.float32, "cpu"
    )
    with pytest.raises(ValueError, match="slot_mapping"):
        prefill_context(torch_kernels(cache), [3])
