"""Qwen3-MoE text models, plain and with DeepStack.

`Qwen3MoeModel` is the Qwen2-MoE stack with Qwen3's options (q/k RMSNorm, no qkv bias, no
shared expert), which come from the config. The *WithDeepStack classes are what the language
service runs when the vision tower lives in another process: they take image embeddings
already scattered into `inputs_embeds` plus `input_deepstack_embeds` [T, k·H].
"""

from __future__ import annotations

import torch

from models.attention import AttentionBackend, AttentionMetadata
from models.config import TextConfig
from models.deepstack import DeepStackMixin
from models.qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeModel


class Qwen3MoeModel(Qwen2MoeModel):
    def __init__(self, config: TextConfig) -> None:
        if not config.qk_norm or config.shared_expert_intermediate_size:
            raise ValueError("Qwen3-MoE layers have q/k norm and no shared expert; this config is Qwen2-MoE")
        super().__init__(config)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    model_class = Qwen3MoeModel


class Qwen3MoeModelWithDeepStack(DeepStackMixin, Qwen3MoeModel):
    """The language side of disaggregation: Qwen3MoeModel plus the DeepStack additions."""


class Qwen3MoeForCausalLMWithDeepStack(Qwen3MoeForCausalLM):
    """What the language service runs: text + image embeddings in, hidden states out."""

    model_class = Qwen3MoeModelWithDeepStack

    def forward(
        self,
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: AttentionMetadata,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(
            positions,
            attn,
            meta,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            input_deepstack_embeds=input_deepstack_embeds,
        )
