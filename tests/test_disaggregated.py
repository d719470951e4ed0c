"""Disaggregated == monolithic: vision tower -> wire codec -> Qwen3MoeForCausalLMWithDeepStack
gives bit-identical logits to Qwen3VLMoeForConditionalGeneration (CPU, fp32), for k = 3 and
for k = 2 DeepStack levels taken at other vision blocks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.config import load_config
from models.loader import load_model
from splitvl.offline import ImageInput, OfflineGenerator
from tests.reference import our_prompt_logits


def images_for(grids):
    gen = torch.Generator().manual_seed(7)
    return [ImageInput(torch.randn(t * h * w, 1536, generator=gen), (t, h, w)) for t, h, w in grids]


@pytest.mark.parametrize("fixture,levels", [("vl_ckpt", 3), ("vl_ckpt_k2", 2)])
def test_disaggregated_logits_are_bitwise_equal(request, fixture, levels):
    ckpt = request.getfixturevalue(fixture)
    cfg = load_config(ckpt)
    assert cfg.vision.num_deepstack_levels == levels
    mono = OfflineGenerator(ckpt)
    split = OfflineGenerator(ckpt, disaggregated=True)
    grids = [(1, 4, 6), (1, 8, 4)]
    images = images_for(grids)
    img, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = [5, 6, start, img, end, 7, 8, start, img, end, 9, 10]
    ids = mono.expand_image_tokens(ids, grids)

    # The vision output really carries k levels: [N, H·(1+k)].
    rows = split._encode_over_wire(images)
    assert rows.shape == (sum(t * h * w // 4 for t, h, w in grids), cfg.text.hidden_size * (1 + levels))

    mono_logits = our_prompt_logits(mono.model, cfg, ids, images)
    with torch.no_grad():
        from models.backends import torch_kernels
        from models.forward_context import prefill_context
        from models.mrope import mrope_positions

        positions, _ = mrope_positions(ids, grids, img, cfg.vision.spatial_merge_size)
        hidden = split._prefill(
            torch.tensor(ids), prefill_context(torch_kernels(), [len(ids)], positions=positions), images
        )
        split_logits = split.model.compute_logits(hidden)
    assert torch.equal(mono_logits, split_logits)
    assert mono.generate_ids(ids, images, 12) == split.generate_ids(ids, images, 12)


def test_deepstack_changes_the_output(vl_ckpt):
    """The DeepStack path is live: dropping the levels changes the logits."""
    split = OfflineGenerator(vl_ckpt, disaggregated=True)
    cfg = split.config
    images = images_for([(1, 4, 4)])
    ids = split.expand_image_tokens(
        [5, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 6], [(1, 4, 4)]
    )
    from models.backends import torch_kernels
    from models.forward_context import prefill_context
    from models.mrope import mrope_positions

    ids_t = torch.tensor(ids)
    positions, _ = mrope_positions(ids, [(1, 4, 4)], cfg.image_token_id, 2)
    rows = split._encode_over_wire(images)
    no_levels = rows.clone()
    no_levels[:, cfg.text.hidden_size :] = 0  # the same image embeddings, every DeepStack level zero
    ctx = prefill_context(torch_kernels(), [len(ids)], positions=positions)
    mask = ids_t == cfg.image_token_id
    with torch.no_grad():
        with_ds = split.model(ids_t, replace(ctx, image_mask=mask, image_rows=rows))
        without = split.model(ids_t, replace(ctx, image_mask=mask, image_rows=no_levels))
    assert (with_ds - without).abs().max().item() > 1e-3


def test_language_part_needs_no_vision_weights(vl_ckpt):
    language = load_model(vl_ckpt, part="language")
    assert not any("visual" in name for name, _ in language.model.named_parameters())
