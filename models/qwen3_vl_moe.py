"""Qwen3-VL-MoE, monolithic: the vision tower and the language model in one module.

The serving system splits this model across two services; this class exists as the reference
the split must reproduce (disaggregated == monolithic) and for offline use. Its text half,
`Qwen3MoeLLMModel`, shares the one DeepStack implementation with the language service's
`Qwen3MoeModelWithDeepStack`.

Legend: T tokens, P patches, N merged image tokens, H text hidden, k DeepStack levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from models.config import ModelConfig
from models.deepstack import DeepStackMixin
from models.forward_context import ForwardContext
from models.multimodal import split_vision_output
from models.qwen3_moe import Qwen3MoeModel
from models.qwen3_vision import Grid, Qwen3_VisionTransformer


class Qwen3MoeLLMModel(DeepStackMixin, Qwen3MoeModel):
    """The text half of the monolithic VL model (M-RoPE positions, DeepStack inputs)."""


class Qwen3VLMoeForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vision is None or config.image_token_id is None:
            raise ValueError("Qwen3VLMoeForConditionalGeneration needs a vision config and image_token_id")
        self.config = config
        self.visual = Qwen3_VisionTransformer(config.vision)
        self.model = Qwen3MoeLLMModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def separate_deepstack_embeds(self, vision_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H·(1+k)] -> (image embeddings [N, H], deepstack embeddings [N, k·H])."""
        return split_vision_output(vision_output, self.config.text.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: Sequence[Grid] | None = None,
    ) -> torch.Tensor:
        """input_ids [T] with each image's placeholder expanded to its N tokens -> [T, H]. The
        tower's rows go to the text half through the context, as the encode service's do."""
        if pixel_values is not None:
            ctx = replace(
                ctx,
                image_mask=input_ids == self.config.image_token_id,
                image_rows=self.visual(pixel_values, image_grid_thw),
            )
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
