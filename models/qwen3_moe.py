"""Qwen3-MoE text models, plain and with DeepStack.

`Qwen3MoeModel` is the Qwen2-MoE stack with Qwen3's options (q/k RMSNorm, no qkv bias, no
shared expert), which come from the config. The *WithDeepStack classes are what the language
service runs when the vision tower lives in another process: token ids in, plus the encoder's
rows in the ForwardContext (`image_mask`, `image_rows`), which they scatter in themselves
(models/deepstack.py).
"""

from __future__ import annotations

from models.config import TextConfig
from models.deepstack import DeepStackMixin
from models.parallel import SINGLE, TensorParallel
from models.qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeModel


class Qwen3MoeModel(Qwen2MoeModel):
    def __init__(self, config: TextConfig, tp: TensorParallel = SINGLE) -> None:
        if not config.qk_norm or config.shared_expert_intermediate_size:
            raise ValueError("Qwen3-MoE layers have q/k norm and no shared expert; this config is Qwen2-MoE")
        super().__init__(config, tp)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    model_class = Qwen3MoeModel


class Qwen3MoeModelWithDeepStack(DeepStackMixin, Qwen3MoeModel):
    """The language side of disaggregation: Qwen3MoeModel plus the DeepStack additions."""


class Qwen3MoeForCausalLMWithDeepStack(Qwen3MoeForCausalLM):
    """What the language service runs: text + image embeddings in, hidden states out."""

    model_class = Qwen3MoeModelWithDeepStack
