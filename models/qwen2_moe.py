"""Qwen2-MoE: the text-only base of every language model here.

`Qwen2MoeModel` is embeddings, decoder layers and the final norm over a flat varlen batch. It owns
the one decoder loop; a subclass changes what goes in through `embed_inputs` and adds a step
after each layer through `after_layer` (the DeepStack models do both, models/deepstack.py). The
Qwen3 text models reuse it with different attention/MoE options from the config (q/k norm, no
qkv bias, no shared expert); nothing here knows about images or DeepStack.

Every forward reads its step from a ForwardContext (models/forward_context.py): kernels,
attention metadata, positions.

Legend: T tokens, H hidden, Hq/Hkv query/kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import TextConfig
from models.forward_context import ForwardContext
from models.layers import DenseMLP, RMSNorm, RotaryEmbedding
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

        self.eps = config.rms_norm_eps
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_qkv()
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Put the q, k and v weights in one [(Hq + 2Hkv)·D, H] tensor and make the three
        projections views of it: one GEMM instead of three per layer (at one decode token each is
        launch-bound), with no extra memory. Checkpoint names and state_dict are unchanged."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight for p in projs])
        self.qkv_bias = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
        start = 0
        for p in projs:
            rows = p.weight.shape[0]
            p.weight = nn.Parameter(self.qkv_weight[start : start + rows], requires_grad=False)
            if self.qkv_bias is not None:
                p.bias = nn.Parameter(self.qkv_bias[start : start + rows], requires_grad=False)
            start += rows

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        if self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(
                [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else None
        out = ctx.attn.forward(self.layer_idx, q, k, v, norms, self.eps, rope, ctx.batch)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
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
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried as (h, residual), its value being h + residual (h alone
        when residual is None): each residual add happens inside the next norm, one fused kernel
        on GPU. Same numbers as `h = h + attn(norm(h)); h = h + mlp(norm(h))`."""
        ops = ctx.ops
        if residual is None:
            x, residual = self.input_layernorm(h, ops), h
        else:
            x, residual = self.input_layernorm.add_forward(h, residual, ops)
        x, residual = self.post_attention_layernorm.add_forward(self.self_attn(x, rope, ctx), residual, ops)
        return (self.mlp(x, ctx) if self.is_moe else self.mlp(x)), residual


class Qwen2MoeModel(nn.Module):
    """Text-only decoder stack: [T] token ids (or [T, H] embeddings) -> [T, H] hidden states."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """One GEMM for q, k and v in every layer (see Attention.fuse_qkv)."""
        for layer in self.layers:
            layer.self_attn.fuse_qkv()

    def embed_inputs(self, input_ids: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, object]:
        """[T] token ids -> ([T, H] first hidden states, what `after_layer` needs; nothing here)."""
        if ctx.image_rows is not None:
            raise ValueError(f"{type(self).__name__} is a text-only stack: it takes no image rows")
        return self.embed_tokens(input_ids), None

    def after_layer(self, layer_idx: int, h: torch.Tensor, residual: torch.Tensor | None,
                    extra: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A step after decoder layer `layer_idx` on the stream (h, residual); none here."""
        return h, residual

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, extra = self.embed_inputs(input_ids, ctx)
        rope = self.rotary(ctx.positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, rope, ctx)
            h, residual = self.after_layer(layer.layer_idx, h, residual, extra)
        if residual is None:
            return self.norm(h, ctx.ops)
        return self.norm.add_forward(h, residual, ctx.ops)[0]


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

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """[T] token ids -> [T, H] final hidden states; `compute_logits` turns the rows you need
        into logits."""
        return self.model(input_ids, ctx)

    def fuse_qkv(self) -> None:
        self.model.fuse_qkv()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V]."""
        return self.lm_head(hidden)
