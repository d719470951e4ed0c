"""The class layout of DESIGN.md §2: DeepStack lives only in the VL classes and the
disaggregated language-side classes, and its addition is written once."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

import models
from models.config import load_config
from models.deepstack import DeepStackMixin, add_deepstack
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


def test_text_only_classes_have_no_deepstack_parameter_or_attribute(qwen3_text_ckpt):
    cfg = load_config(qwen3_text_ckpt).text
    for cls in TEXT_ONLY:
        assert "deepstack" not in str(inspect.signature(cls.forward)).lower(), cls
        assert not any("deepstack" in name.lower() for name in dir(cls)), cls
        assert not issubclass(cls, DeepStackMixin), cls
    instance = Qwen3MoeForCausalLM(cfg)
    assert not any("deepstack" in name.lower() for name in vars(instance))


def test_deepstack_classes_take_deepstack_embeds():
    for cls in (Qwen3MoeModelWithDeepStack, Qwen3MoeLLMModel, Qwen3MoeForCausalLMWithDeepStack):
        assert "input_deepstack_embeds" in inspect.signature(cls.forward).parameters, cls
    assert hasattr(Qwen3VLMoeForConditionalGeneration, "separate_deepstack_embeds")
    for cls in (Qwen3MoeModelWithDeepStack, Qwen3MoeLLMModel):
        # Both take forward() from the one mixin instead of defining their own.
        assert "forward" not in vars(cls), cls
        assert cls.forward is DeepStackMixin.forward


def test_deepstack_addition_is_written_once():
    # Modeling code only: tiny_checkpoint.py spells out the real model's config values as data.
    sources = {p.name: p.read_text() for p in Path(models.__file__).parent.glob("*.py")
               if not p.name.startswith("tiny_")}
    # The column slice that picks one level out of [T, k·H] appears in one file only.
    users = [name for name, src in sources.items() if "layer_idx * hidden" in src]
    assert users == ["deepstack.py"]
    # No literal level count: k always comes from the config or the tensor's width.
    for name, src in sources.items():
        assert "deepstack_visual_indexes=[8, 16, 24]" not in src, name
        assert "range(3)" not in src, name


def test_add_deepstack_adds_level_i_after_layer_i_only():
    h = torch.randn(5, 4)
    levels = torch.randn(5, 2 * 4)
    assert torch.equal(add_deepstack(h, 0, levels), h + levels[:, :4])
    assert torch.equal(add_deepstack(h, 1, levels), h + levels[:, 4:])
    assert torch.equal(add_deepstack(h, 2, levels), h)
    assert torch.equal(add_deepstack(h, 0, None), h)
