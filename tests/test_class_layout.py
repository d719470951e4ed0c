"""The class layout of DESIGN.md §2, checked by behaviour: DeepStack lives only in the VL classes
and the disaggregated language-side classes, the decoder loop is written once (in Qwen2MoeModel)
and the deepstack step once (models/deepstack.py), and k comes from the vision config."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

from models.backends import torch_kernels
from models.config import load_config
from models.deepstack import DeepStackMixin, add_deepstack
from models.forward_context import prefill_context
from models.loader import load_model
from models.qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeModel
from models.qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeForCausalLMWithDeepStack,
    Qwen3MoeModel,
    Qwen3MoeModelWithDeepStack,
)
from models.qwen3_vl_moe import Qwen3MoeLLMModel, Qwen3VLMoeForConditionalGeneration

TEXT_ONLY = [Qwen2MoeModel, Qwen2MoeForCausalLM, Qwen3MoeModel, Qwen3MoeForCausalLM]
WITH_DEEPSTACK = [Qwen3MoeModelWithDeepStack, Qwen3MoeForCausalLMWithDeepStack, Qwen3MoeLLMModel]


def test_inheritance_follows_the_design_card():
    assert issubclass(Qwen3MoeModel, Qwen2MoeModel)
    assert issubclass(Qwen3MoeModelWithDeepStack, Qwen3MoeModel)
    assert issubclass(Qwen3MoeLLMModel, Qwen3MoeModel)
    assert Qwen3MoeModelWithDeepStack.__module__ == "models.qwen3_moe"
    assert Qwen3MoeLLMModel.__module__ == "models.qwen3_vl_moe"
    assert Qwen2MoeModel.__module__ == "models.qwen2_moe"
    assert hasattr(Qwen3VLMoeForConditionalGeneration, "separate_deepstack_embeds")


def test_text_only_classes_have_no_deepstack_parameter_or_attribute(qwen3_text_ckpt):
    cfg = load_config(qwen3_text_ckpt).text
    for cls in TEXT_ONLY:
        assert "deepstack" not in str(inspect.signature(cls.forward)).lower(), cls
        assert not any("deepstack" in name.lower() for name in dir(cls)), cls
        assert not issubclass(cls, DeepStackMixin), cls
    instance = Qwen3MoeForCausalLM(cfg)
    assert not any("deepstack" in name.lower() for name in vars(instance))


def test_every_stack_runs_the_one_decoder_loop():
    for cls in [Qwen3MoeModel, Qwen3MoeModelWithDeepStack, Qwen3MoeLLMModel]:
        assert cls.forward is Qwen2MoeModel.forward, cls


def _image_prompt(cfg, k_rows: int | None = None, seed: int = 0):
    """Token ids with one 4-row image and random vision rows [4, H·(1+k)]."""
    img = cfg.image_token_id
    ids = torch.tensor([5, 6, cfg.vision_start_token_id, img, img, img, img, cfg.vision_end_token_id, 7])
    k = cfg.vision.num_deepstack_levels if k_rows is None else k_rows
    rows = torch.randn(4, cfg.text.hidden_size * (1 + k), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(len(ids)).expand(3, -1)
    ctx = prefill_context(torch_kernels(), [len(ids)], positions=positions)
    return ids, replace(ctx, image_mask=ids == img, image_rows=rows), rows


@torch.no_grad()
def test_both_deepstack_stacks_compute_the_same(vl_ckpt):
    """The language service's stack and the monolithic model's text half share one deepstack step."""
    cfg = load_config(vl_ckpt)
    served = load_model(vl_ckpt, part="language", dtype=torch.float32).model
    mono = load_model(vl_ckpt, part="full", dtype=torch.float32).model
    ids, ctx, _ = _image_prompt(cfg)
    assert torch.equal(served.model(ids, ctx), mono.model(ids, ctx))


@torch.no_grad()
@pytest.mark.parametrize("fixture", ["vl_ckpt", "vl_ckpt_k2"])
def test_each_level_reaches_the_output_and_k_comes_from_the_config(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    cfg = load_config(ckpt)
    k = cfg.vision.num_deepstack_levels
    assert k == len(cfg.vision.deepstack_visual_indexes)
    model = load_model(ckpt, part="language", dtype=torch.float32).model
    ids, ctx, rows = _image_prompt(cfg)
    base = model(ids, ctx)
    hidden = cfg.text.hidden_size
    for level in range(k):  # zeroing any one level changes the output
        cut = rows.clone()
        cut[:, hidden * (1 + level) : hidden * (2 + level)] = 0
        assert (model(ids, replace(ctx, image_rows=cut)) - base).abs().max() > 1e-4, level
    # Text rows before the image see no image: the same as a text-only prompt's rows.
    text_only = model(ids[:2], prefill_context(torch_kernels(), [2], positions=torch.arange(2).expand(3, -1)))
    torch.testing.assert_close(base[:2], text_only, rtol=0, atol=1e-5)


def test_text_only_stack_refuses_image_rows(qwen3_text_ckpt, vl_ckpt):
    model = load_model(qwen3_text_ckpt, dtype=torch.float32).model
    _, ctx, _ = _image_prompt(load_config(vl_ckpt))
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13])
    with pytest.raises(ValueError, match="takes no image rows"):
        model(ids, replace(ctx, positions=torch.arange(9)))


def test_add_deepstack_adds_level_i_after_layer_i_only():
    h = torch.randn(5, 4)
    levels = torch.randn(5, 2 * 4)
    assert torch.equal(add_deepstack(h, 0, levels), h + levels[:, :4])
    assert torch.equal(add_deepstack(h, 1, levels), h + levels[:, 4:])
    assert torch.equal(add_deepstack(h, 2, levels), h)
    assert torch.equal(add_deepstack(h, 0, None), h)
