"""Qwen2-MoE: the text-only base of every language model here.

`Qwen2MoeModel` is embeddings, decoder layers and the final norm over a flat varlen batch.
The Qwen3 text models reuse it with different attention/MoE options from the config (q/k norm,
no qkv bias, no shared expert); nothing here knows about images or DeepStack.

Legend: T tokens, H hidden, Hq/Hkv query/kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import AttentionBackend, AttentionMetadata
from models.config import TextConfig
from models.layers import DenseMLP, RMSNorm, RotaryEmbedding, apply_rotary
from models.moe import SparseMoeBlock


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # global index: the KV cache and pipeline ranks key on it
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v, meta)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(
                config.hidden_size,
                config.num_experts,
                config.num_experts_per_tok,
                config.moe_intermediate_size,
                config.norm_topk_prob,
                config.shared_expert_intermediate_size,
            )
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, attn, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2MoeModel(nn.Module):
    """Text-only decoder stack: [T] token ids (or [T, H] embeddings) -> [T, H] hidden states."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def forward(
        self,
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: AttentionMetadata,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.embed(input_ids, inputs_embeds)
        rope = self.rotary(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, rope, attn, meta)
        return self.norm(h)


class Qwen2MoeForCausalLM(nn.Module):
    """Decoder stack + lm_head. Subclasses swap the stack through `model_class`."""

    model_class: type[Qwen2MoeModel] = Qwen2MoeModel

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: AttentionMetadata,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> [T, H] final hidden states; `compute_logits` turns the rows you need into logits."""
        return self.model(positions, attn, meta, input_ids=input_ids, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V]."""
        return self.lm_head(hidden)
