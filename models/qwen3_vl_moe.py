"""Qwen3-VL-MoE, monolithic: the vision tower and the language model in one module.

The serving system splits this model across two services; this class exists as the reference
the split must reproduce (disaggregated == monolithic) and for offline use. Its text half,
`Qwen3MoeLLMModel`, shares the one DeepStack implementation with the language service's
`Qwen3MoeModelWithDeepStack`.

Legend: T tokens, P patches, N merged image tokens, H text hidden, k DeepStack levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.attention import AttentionBackend, AttentionMetadata
from models.config import ModelConfig
from models.deepstack import DeepStackMixin
from models.multimodal import scatter_vision_rows, split_vision_output
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
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: AttentionMetadata,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: Sequence[Grid] | None = None,
    ) -> torch.Tensor:
        """input_ids [T] with each image's placeholder expanded to its N tokens -> [T, H]."""
        inputs_embeds = self.model.embed_tokens(input_ids)
        deepstack = None
        if pixel_values is not None:
            vision_output = self.visual(pixel_values, image_grid_thw)
            image_mask = input_ids == self.config.image_token_id
            inputs_embeds, deepstack = scatter_vision_rows(inputs_embeds, image_mask, vision_output)
        return self.model(
            positions, attn, meta, inputs_embeds=inputs_embeds, input_deepstack_embeds=deepstack
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
