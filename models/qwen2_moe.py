"""Qwen2-MoE: the text-only base of every language model here.

Everything the decoder stack is made of lives here, top to bottom: RMSNorm, rotary tables, the
dense and MoE MLPs, attention, the decoder layer and the stack itself (the kernels they call come
from the step's ForwardContext: models/attention.py's backends, models/ops.py, models/moe.py).

`Qwen2MoeModel` is embeddings, decoder layers and the final norm over a flat varlen batch. It owns
the one decoder loop; a subclass changes what goes in through `embed_inputs` and adds a step
after each layer through `after_layer` (the DeepStack models do both, models/deepstack.py). The
Qwen3 text models reuse it with different attention/MoE options from the config (q/k norm, no
qkv bias, no shared expert); nothing here knows about images or DeepStack.

Tensor parallelism (models/parallel.py): every module takes the rank's `TensorParallel` and
holds its shard under the same parameter names; at one rank (SINGLE) nothing changes.

Legend: T tokens, H hidden, Hq/Hkv query/kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import TextConfig
from models.forward_context import ForwardContext
from models.kernels.fp8_linear import fp8_linear
from models.ops import OpsImpl
from models.parallel import SINGLE, TensorParallel


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: OpsImpl) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, ops: OpsImpl) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the next norm, one kernel on GPU."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); the intermediate dimension split over the ranks.
    `reduce=False` leaves the rank's partial sum to the caller (the shared expert: one all-reduce
    serves the whole MoE block)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, tp: TensorParallel = SINGLE, reduce: bool = True
    ) -> None:
        super().__init__()
        local = tp.split(intermediate_size)[1]
        self.tp = tp if reduce else SINGLE
        self.gate_proj = nn.Linear(hidden_size, local, bias=False)
        self.up_proj = nn.Linear(hidden_size, local, bias=False)
        self.down_proj = nn.Linear(local, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class VocabParallelEmbedding(nn.Module):
    """The token embedding, its rows split over the ranks (the vocabulary padded to a multiple of
    the rank count): each rank looks up the ids it holds, zeros elsewhere, then one all-reduce.
    The parameter is `weight` as in nn.Embedding, so checkpoint names are unchanged."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.first, self.rows = tp.split(tp.padded_vocab(vocab_size))
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        outside = (local < 0) | (local >= self.rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(h)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for 1-D RoPE or Qwen3-VL's interleaved M-RoPE.

    positions is [T] (1-D RoPE) or [3, T] (M-RoPE: temporal, height, width). With M-RoPE the
    D/2 frequencies are assigned round-robin T,H,W,T,H,W,... (stride 3) for as many as each
    axis's mrope_section allows; the rest stay temporal. A [T] position on an M-RoPE model means
    text only (all three axes equal).
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = mrope_section

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # Recomputed per call rather than kept as a buffer: loading builds modules on the meta
        # device, and a D/2-element pow is free next to any forward.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq(positions.device)
        if self.mrope_section is not None and positions.dim() == 2:
            freqs = positions[..., None].float() * inv_freq  # [3, T, D/2]
            combined = freqs[0].clone()
            for axis, offset in ((1, 1), (2, 2)):
                idx = slice(offset, self.mrope_section[axis] * 3, 3)
                combined[..., idx] = freqs[axis][..., idx]
            freqs = combined
        else:
            if positions.dim() != 1:
                raise ValueError(f"positions must be [T] for 1-D RoPE, got {tuple(positions.shape)}")
            freqs = positions[:, None].float() * inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Experts(nn.Module):
    """The rank's experts: all E with their intermediate slice, or (expert-parallel) E/size whole."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.first, local_experts = tp.experts(num_experts)
        inter = tp.expert_intermediate(intermediate_size)[1]
        self.gate_up_proj = nn.Parameter(torch.empty(local_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(local_experts, hidden_size, inter))
        self.partitioned = local_experts < num_experts  # some routed experts live on other ranks

    @property
    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block scales of FP8 experts (models/fp8_layers.py), None for plain ones."""
        if not hasattr(self, "gate_up_proj_scale_inv"):
            return None
        return self.gate_up_proj_scale_inv, self.down_proj_scale_inv

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Routed expert ids -> this rank's indices; an expert of another rank becomes E_local,
        which the expert kernels skip (its term is added on the rank that holds it)."""
        if not self.partitioned:
            return ids
        local = ids - self.first
        count = self.gate_up_proj.shape[0]
        return torch.where((local >= 0) & (local < count), local, count)


class SparseMoeBlock(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        norm_topk_prob: bool,
        shared_expert_intermediate_size: int = 0,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router: replicated
        self.experts = Experts(num_experts, hidden_size, intermediate_size, tp)
        # Qwen2-MoE only: an always-on expert scaled by a sigmoid gate.
        if shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(hidden_size, shared_expert_intermediate_size, tp, reduce=False)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        moe = ctx.kernels.moe
        weights, ids = moe.route(self.gate(x), self.top_k, self.norm_topk_prob)
        experts = self.experts
        fp8 = {} if experts.scales is None else {"scales": experts.scales}
        if experts.partitioned:
            out = moe.experts(
                x, experts.gate_up_proj, experts.down_proj, weights, experts.local_ids(ids), skip_foreign=True, **fp8
            )
        else:
            out = moe.experts(x, experts.gate_up_proj, experts.down_proj, weights, ids, **fp8)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)  # every rank's partial sum (its experts or its slices)


class Attention(nn.Module):
    """Self-attention over the rank's heads: q/k/v column-parallel, o_proj row-parallel and one
    all-reduce (models/parallel.py)."""

    def __init__(self, config: TextConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # global index: the KV cache and pipeline ranks key on it
        self.tp = tp
        self.num_heads = tp.split(config.num_attention_heads)[1]
        self.num_kv_heads = tp.kv_heads(config.num_key_value_heads)[1]
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
        self.qkv_scale: torch.Tensor | None = None  # FP8 projections: their fused scale grid

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Put the q, k and v weights in one [(Hq + 2Hkv)·D, H] tensor and make the three
        projections views of it: one GEMM instead of three per layer (at one decode token each is
        launch-bound), with no extra memory. Checkpoint names and state_dict are unchanged. FP8
        projections fuse with their scale grids when the q and k blocks end on 128-row block
        edges (Qwen3-VL-30B-A3B: 4096 and 512 rows); otherwise they stay three GEMMs."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fp8 = hasattr(self.q_proj, "weight_scale_inv")
        if fp8 and any(p.weight.shape[0] % 128 for p in projs[:2]):
            return
        self.qkv_weight = torch.cat([p.weight for p in projs])
        self.qkv_bias = torch.cat([p.bias for p in projs]) if self.q_proj.bias is not None else None
        self.qkv_scale = torch.cat([p.weight_scale_inv for p in projs]) if fp8 else None
        start, grid_start = 0, 0
        for p in projs:
            rows = p.weight.shape[0]
            p.weight = nn.Parameter(self.qkv_weight[start : start + rows], requires_grad=False)
            if self.qkv_bias is not None:
                p.bias = nn.Parameter(self.qkv_bias[start : start + rows], requires_grad=False)
            if fp8:
                grid_rows = p.weight_scale_inv.shape[0]
                p.weight_scale_inv = nn.Parameter(
                    self.qkv_scale[grid_start : grid_start + grid_rows], requires_grad=False
                )
                grid_start += grid_rows
            start += rows

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        if self.qkv_weight is not None:
            if self.qkv_scale is None:
                qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            else:
                qkv = fp8_linear(x, self.qkv_weight, self.qkv_scale, self.qkv_bias)
            q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v.view(t, self.num_kv_heads, d)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else None
        out = ctx.attn.forward(self.layer_idx, q, k, v, norms, self.eps, rope, ctx.batch)  # [T, Hq, D]
        return self.tp.all_reduce(self.o_proj(out.reshape(t, -1)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(config, layer_idx, tp)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = SparseMoeBlock(
                config.hidden_size,
                config.num_experts,
                config.num_experts_per_tok,
                config.moe_intermediate_size,
                config.norm_topk_prob,
                config.shared_expert_intermediate_size,
                tp,
            )
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, tp)
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

    def __init__(self, config: TextConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
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

    def after_layer(
        self, layer_idx: int, h: torch.Tensor, residual: torch.Tensor | None, extra: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    """Decoder stack + lm_head. Subclasses swap the stack through `model_class`. The lm_head is
    column-parallel over the padded vocabulary: `compute_logits` gathers the ranks' columns."""

    model_class: type[Qwen2MoeModel] = Qwen2MoeModel

    def __init__(self, config: TextConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = self.model_class(config, tp)
        self.lm_head = nn.Linear(config.hidden_size, tp.split(tp.padded_vocab(config.vocab_size))[1], bias=False)
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
        if self.tp.size == 1:
            return self.lm_head(hidden)
        return self.tp.all_gather_last(self.lm_head(hidden))[:, : self.config.vocab_size]
