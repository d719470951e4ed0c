"""Runs one engine step on the model: flat varlen inputs in, one sampled token per finished row out.

Builds what models/ needs through the attention-backend interface: token ids (or, when image
tokens are in the batch, embeddings with the encoder's rows scattered in plus the DeepStack
rows), positions ([3, T] M-RoPE for VL models, [T] otherwise) and AttentionMetadata with the
paged KV cache's slots and block tables.

On CUDA the model runs on the Triton kernels (fused MoE, paged decode attention, flash varlen
prefill, fused norm / rotary / routing ops, one qkv GEMM; models/kernels/) and decode-only steps replay CUDA graphs (cuda_graphs.py); prefill and
mixed steps run eagerly. Elsewhere it runs the torch references. `RunnerOptions` switches each
part off for debugging.

Legend: T tokens in the step, B sequences, H hidden, k DeepStack levels, V vocab.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from language_server.engine.request import EngineRequest
from language_server.engine.sampler import sample
from language_server.protocol import TokenLogprob
from models.attention import AttentionBackend, AttentionMetadata, PagedKVCache, TorchAttentionBackend
from models.config import ModelConfig, dtype_from_name, load_config
from models.device import resolve_device
from models.loader import LoadedModel, load_model
from models.mrope import generated_positions
from models.multimodal import scatter_vision_rows
from models.qwen2_moe import Qwen2MoeForCausalLM
from models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeForCausalLMWithDeepStack

if TYPE_CHECKING:  # imported lazily at run time: cuda_graphs imports triton, which CPU runs do without
    from language_server.engine.cuda_graphs import DecodeGraphRunner, DecodeStep

log = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30  # default KV budget without a GPU


@dataclass(frozen=True)
class RunnerOptions:
    """How the runner executes. EngineCore passes none yet, so `from_env` reads the switches
    from SPLITVL_KERNELS, SPLITVL_CUDA_GRAPHS and SPLITVL_LOAD_FORMAT."""

    kernels: str = "auto"  # "auto": Triton kernels on CUDA; "torch": the torch references
    cuda_graphs: str = "on"  # "on": decode graphs on CUDA; "off"; "nocapture": the graph path without graphs
    load_format: str = "safetensors"  # "dummy": random weights drawn on the device (benchmarks)
    max_num_seqs: int = 256  # largest decode batch with a graph
    max_model_len: int = 8192  # sets the graphs' block-table width; longer sequences decode eagerly

    CHOICES = {"kernels": ("auto", "torch"), "cuda_graphs": ("on", "off", "nocapture"),
               "load_format": ("safetensors", "dummy")}

    def __post_init__(self) -> None:
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)} "
                                 f"(environment variable SPLITVL_{name.upper()})")

    @classmethod
    def from_env(cls, **overrides: object) -> "RunnerOptions":
        env = {name: os.environ[f"SPLITVL_{name.upper()}"].lower() for name in cls.CHOICES
               if f"SPLITVL_{name.upper()}" in os.environ}
        return replace(cls(**env), **overrides)


@dataclass
class ScheduledChunk:
    request: EngineRequest
    start: int  # first token to compute
    count: int  # tokens to compute this step

    @property
    def samples(self) -> bool:
        """Does this chunk reach the end of the sequence (so its last row is sampled)?"""
        return self.start + self.count == self.request.num_tokens


class ModelRunner:
    def __init__(self, model_dir: str, device: str, dtype: str, block_size: int,
                 num_kv_blocks: int | None, kv_memory_fraction: float, options: RunnerOptions | None = None) -> None:
        self.options = options or RunnerOptions.from_env()
        self.device = resolve_device(device)  # a GPU is made current: the engine process works on one
        self.dtype = dtype_from_name(dtype)
        if self.options.load_format == "dummy":
            loaded = random_language_model(model_dir, self.device, self.dtype)
        else:
            loaded = load_model(model_dir, part="language", device=self.device, dtype=self.dtype)
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        text = self.config.text
        self.block_size = block_size
        per_block = 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim \
            * self.dtype.itemsize
        if num_kv_blocks is None:
            num_kv_blocks = max(1, self._kv_budget_bytes(kv_memory_fraction) // per_block - 1)
        self.num_kv_blocks = num_kv_blocks
        # One block more than the scheduler hands out: padding rows of graph steps write there.
        self.kv_cache = PagedKVCache(text.num_hidden_layers, num_kv_blocks + 1, block_size, text.num_key_value_heads,
                                     text.head_dim, self.dtype, self.device)
        self.attn = self._select_kernels()
        self.decode_graphs = self._decode_graphs()
        self.use_decode_graphs = self.decode_graphs is not None  # benchmarks flip it to time both paths

    def _kv_budget_bytes(self, fraction: float) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * fraction)
        return _CPU_KV_BYTES

    def _select_kernels(self) -> AttentionBackend:
        """Swap the experts implementation, set `uses_triton`, and return the attention backend."""
        self.uses_triton = False
        if self.device.type != "cuda":
            return TorchAttentionBackend(self.kv_cache)
        # Imported here: the kernels import triton, which CPU processes do not need.
        from models.kernels import FUSED_OPS, HAS_TRITON, TritonAttentionBackend, triton_fused_experts
        from models.moe import set_experts_impl, torch_fused_experts
        from models.ops import TORCH_OPS, set_ops_impl

        self.uses_triton = self.options.kernels == "auto" and HAS_TRITON
        if self.options.kernels == "auto" and not HAS_TRITON:
            log.warning("triton is not installed: running the torch reference kernels (pip install triton)")
        set_experts_impl(triton_fused_experts if self.uses_triton else torch_fused_experts)
        set_ops_impl(FUSED_OPS if self.uses_triton else TORCH_OPS)
        if self.uses_triton:
            for layer in self.model.model.layers:
                layer.self_attn.fuse_qkv()  # one GEMM for q, k and v
        return TritonAttentionBackend(self.kv_cache) if self.uses_triton else TorchAttentionBackend(self.kv_cache)

    def _decode_graphs(self) -> DecodeGraphRunner | None:
        mode = self.options.cuda_graphs
        # The torch reference experts sync with the host (per-expert counts), so only the Triton
        # path can be captured.
        capture = mode == "on" and self.uses_triton
        if not capture and mode != "nocapture":
            return None
        from language_server.engine.cuda_graphs import DecodeGraphRunner

        return DecodeGraphRunner(
            self.model, self.kv_cache,
            max_batch=self.options.max_num_seqs,
            max_blocks=-(-self.options.max_model_len // self.block_size),
            scratch_block=self.num_kv_blocks,
            mrope=self.config.is_vl,
            capture=capture,
        )

    @torch.no_grad()
    def run(self, chunks: Sequence[ScheduledChunk]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Compute the chunks' tokens; sample for every chunk that reaches its sequence's end."""
        logits = self.compute_logits(chunks)
        if logits is None:
            return [], []
        return sample(logits, [c.request for c in chunks if c.samples])

    @torch.no_grad()
    def compute_logits(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor | None:
        """Logits [n, V] of the n chunks that sample, in chunk order; None if none does."""
        if self._graph_step(chunks):
            logits = self.decode_graphs.run(self._decode_step(chunks))  # [B, V]
            if all(c.samples for c in chunks):
                return logits
            rows = [i for i, c in enumerate(chunks) if c.samples]
            return logits[torch.tensor(rows, device=self.device)] if rows else None
        return self._eager_logits(chunks)

    # ----- decode steps on the graph path ---------------------------------------------------

    def _graph_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        graphs = self.decode_graphs
        if not self.use_decode_graphs or graphs is None or not graphs.fits(len(chunks), 0):
            return False
        longest = 0
        for c in chunks:
            req = c.request
            if c.count != 1 or (req.image_rows is not None and c.start < req.num_prompt_tokens):
                return False  # a prompt chunk, or possibly an image token: the eager path
            longest = max(longest, c.start)
        return graphs.fits(len(chunks), longest // self.block_size + 1)

    def _decode_step(self, chunks: Sequence[ScheduledChunk]) -> DecodeStep:
        from language_server.engine.cuda_graphs import DecodeStep

        bs = self.block_size
        mrope = self.config.is_vl
        ids, slots, lens, tables = [], [], [], []
        axes: list[list[int]] = [[], [], []] if mrope else [[]]
        for c in chunks:
            req, pos = c.request, c.start
            ids.append(req.token_ids[pos])
            slots.append(req.block_ids[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            tables.append(req.block_ids[: pos // bs + 1])
            if req.positions is not None and pos < req.num_prompt_tokens:
                for axis, value in zip(axes, req.positions[:, pos].tolist()):
                    axis.append(value)
            else:
                shifted = pos + req.rope_delta
                for axis in axes:
                    axis.append(shifted)
        return DecodeStep(token_ids=ids, positions=axes, slots=slots, context_lens=lens, block_tables=tables)

    # ----- every other step, eagerly ---------------------------------------------------------

    def _eager_logits(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor | None:
        ids = torch.tensor([t for c in chunks for t in c.request.token_ids[c.start : c.start + c.count]])
        positions = torch.cat([self._positions(c) for c in chunks], dim=-1)
        meta = self._metadata(chunks)
        ids = ids.to(self.device)
        positions = positions.to(self.device)
        vision = self._vision_inputs(chunks)
        if vision is None:
            hidden = self.model(positions, self.attn, meta, input_ids=ids)
        else:
            mask, rows = vision
            embeds, deepstack = scatter_vision_rows(self.model.model.embed_tokens(ids), mask, rows)
            hidden = self.model(positions, self.attn, meta, inputs_embeds=embeds, input_deepstack_embeds=deepstack)
        ends, end = [], 0
        for c in chunks:
            end += c.count
            if c.samples:
                ends.append(end - 1)
        if not ends:
            return None
        return self.model.compute_logits(hidden[torch.tensor(ends, device=self.device)])

    def _positions(self, chunk: ScheduledChunk) -> torch.Tensor:
        req, a, n = chunk.request, chunk.start, chunk.count
        if req.positions is None:
            return torch.arange(a, a + n)
        # Prompt tokens have precomputed M-RoPE positions; generated ones are index + delta.
        prompt = req.positions[:, a : min(a + n, req.num_prompt_tokens)]
        tail = generated_positions(max(a, req.num_prompt_tokens), a + n, req.rope_delta)  # empty inside the prompt
        return torch.cat([prompt, tail], dim=1)

    def _metadata(self, chunks: Sequence[ScheduledChunk]) -> AttentionMetadata:
        bs = self.block_size
        slots: list[int] = []
        for c in chunks:
            blocks, first, end = c.request.block_ids, c.start, c.start + c.count
            # One range per block the chunk touches, not one Python step per token.
            for j in range(first // bs, (end - 1) // bs + 1):
                base = blocks[j] * bs
                slots.extend(range(base + max(first - j * bs, 0), base + min(end - j * bs, bs)))
        width = max(len(c.request.block_ids) for c in chunks)
        tables = np.zeros((len(chunks), width), dtype=np.int64)
        for row, c in enumerate(chunks):
            tables[row, : len(c.request.block_ids)] = c.request.block_ids
        return AttentionMetadata(
            query_lens=[c.count for c in chunks],
            context_lens=[c.start + c.count for c in chunks],
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=torch.from_numpy(tables).to(self.device),
        )

    def _vision_inputs(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask [T] of the step's positions that take an encoder row, those rows in batch order),
        or None when the step has no image position. The mask comes from each request's prompt,
        never from token ids: a generated token can be the image token id and has no row."""
        masks, parts = [], []
        for c in chunks:
            req, end = c.request, c.start + c.count
            prompt_end = min(end, req.num_prompt_tokens)
            if req.image_rows is None or c.start >= prompt_end:
                masks.append(torch.zeros(c.count, dtype=torch.bool))
                continue
            masks.append(req.image_mask[c.start : prompt_end])
            if end > prompt_end:  # a recomputed chunk that runs on into generated tokens
                masks.append(torch.zeros(end - prompt_end, dtype=torch.bool))
            first, last = req.image_row_start[c.start], req.image_row_start[prompt_end]
            if last > first:
                parts.append(req.image_rows[first:last])
        if not parts:
            return None
        return torch.cat(masks).to(self.device), torch.cat(parts)


def random_language_model(model_dir: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """The language model of `model_dir`'s config.json with random weights drawn on `device`
    (vLLM's --load-format dummy): benchmarks at the real shapes without 60 GB of files.

    Scales follow models/tiny_checkpoint.py, so activations stay unit-scale and routing and
    logits are decisive: linear weights ~ N(0, 1/fan_in), residual writers x1.5/sqrt(layers)
    (expert down_proj x1.5 more), norms 1 +- 0.1, biases and embeddings N(0, 0.1^2) / N(0, 1),
    router N(0, 9/H), lm_head N(0, 36/H).
    """
    config = load_config(model_dir)
    text = config.text
    cls = Qwen3MoeForCausalLMWithDeepStack if config.is_vl else (
        Qwen2MoeForCausalLM if text.arch == "qwen2_moe" else Qwen3MoeForCausalLM)
    with torch.device("meta"):
        model = cls(text)
    model = model.to(dtype=dtype).to_empty(device=device)
    if text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    residual = 1.5 / math.sqrt(text.num_hidden_layers)
    inv_sqrt_h = 1 / math.sqrt(text.hidden_size)
    for name, param in model.named_parameters():
        mean, std = 0.0, 1 / math.sqrt(param.shape[-1])  # a linear weight [out, in] or experts [E, out, in]
        if name.endswith("norm.weight"):
            mean, std = 1.0, 0.1
        elif name.endswith("embed_tokens.weight"):
            std = 1.0
        elif name == "lm_head.weight":
            std = 6 * inv_sqrt_h
        elif name.endswith("mlp.gate.weight"):
            std = 3 * inv_sqrt_h
        elif name.endswith(".bias"):
            std = 0.1
        elif name.endswith(("experts.down_proj", "shared_expert.down_proj.weight")):
            std *= 1.5 * residual
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            std *= residual
        with torch.no_grad():
            param.normal_(mean, std, generator=gen)
    model.eval()
    return LoadedModel(model=model, config=config)
