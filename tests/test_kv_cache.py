"""Incremental decoding through the paged KV cache equals full recomputation.

Runs the language side (Qwen3MoeForCausalLMWithDeepStack) the way an engine will: chunked
prefill that cuts through an image, two sequences at different stages in one flat batch, and
scattered (non-contiguous) cache blocks.
"""

from __future__ import annotations

import pytest
import torch

from models.attention import AttentionMetadata, PagedKVCache, TorchAttentionBackend
from models.loader import load_model
from models.mrope import mrope_positions
from models.multimodal import scatter_vision_rows

TOL = 1e-4
BLOCK = 4


@pytest.fixture(scope="module")
def parts(vl_ckpt):
    language = load_model(vl_ckpt, part="language", dtype=torch.float32)
    vision = load_model(vl_ckpt, part="vision", dtype=torch.float32).model
    return language.model, vision, language.config


def build_sequence(lang, vision, cfg, text_before, grid, text_after, seed):
    """Token ids, input embeddings, deepstack rows and M-RoPE positions of one sequence."""
    img = cfg.image_token_id
    n_img = grid[0] * grid[1] * grid[2] // 4 if grid else 0
    ids = text_before + [cfg.vision_start_token_id] + [img] * n_img + [cfg.vision_end_token_id] + text_after \
        if grid else text_before + text_after
    ids_t = torch.tensor(ids)
    embeds = lang.model.embed_tokens(ids_t)
    deepstack = None
    if grid:
        gen = torch.Generator().manual_seed(seed)
        rows = vision(torch.randn(grid[0] * grid[1] * grid[2], 1536, generator=gen), [grid])
        embeds, deepstack = scatter_vision_rows(embeds, ids_t == img, rows)
    positions, _ = mrope_positions(ids, [grid] if grid else [], img, 2)
    return ids, embeds, deepstack, positions


@torch.no_grad()
def test_chunked_and_batched_decode_equals_full_recompute(parts):
    lang, vision, cfg = parts
    seqs = [
        build_sequence(lang, vision, cfg, [11, 12, 13], (1, 4, 8), [14, 15, 16, 17, 18, 19, 20, 21], seed=0),
        build_sequence(lang, vision, cfg, [30, 31, 32, 33, 34, 35, 36, 37, 38], None, [40, 41, 42, 43], seed=1),
    ]
    full = []
    for ids, embeds, ds, pos in seqs:
        meta = AttentionMetadata.prefill([len(ids)])
        hidden = lang(pos, TorchAttentionBackend(), meta, inputs_embeds=embeds, input_deepstack_embeds=ds)
        full.append(lang.compute_logits(hidden))

    text = cfg.text
    cache = PagedKVCache(text.num_hidden_layers, 24, BLOCK, text.num_key_value_heads, text.head_dim,
                         torch.float32, "cpu")
    attn = TorchAttentionBackend(cache)
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
        embeds = torch.cat([seqs[s][1][a : a + n] for s, a, n in step])
        deepstack = torch.cat([
            seqs[s][2][a : a + n] if seqs[s][2] is not None else embeds.new_zeros(n, cfg.vision.num_deepstack_levels * text.hidden_size)
            for s, a, n in step
        ])
        positions = torch.cat([seqs[s][3][:, a : a + n] for s, a, n in step], dim=1)
        meta = AttentionMetadata(
            query_lens=[n for _, _, n in step],
            context_lens=[a + n for _, a, n in step],
            slot_mapping=torch.tensor([slot(s, i) for s, a, n in step for i in range(a, a + n)]),
            block_tables=tables[[s for s, _, _ in step]],
        )
        logits = lang.compute_logits(lang(positions, attn, meta, inputs_embeds=embeds,
                                          input_deepstack_embeds=deepstack))
        for (s, a, n), part in zip(step, logits.split([n for _, _, n in step])):
            assert (part - full[s][a : a + n]).abs().max().item() <= TOL, (s, a, n)
    assert index0 == len0 and index1 == len1


@torch.no_grad()
def test_cache_without_slots_is_refused(parts):
    lang, _, cfg = parts
    text = cfg.text
    cache = PagedKVCache(text.num_hidden_layers, 4, BLOCK, text.num_key_value_heads, text.head_dim,
                         torch.float32, "cpu")
    with pytest.raises(ValueError, match="slot_mapping"):
        lang(torch.arange(3), TorchAttentionBackend(cache), AttentionMetadata.prefill([3]),
             input_ids=torch.tensor([1, 2, 3]))
