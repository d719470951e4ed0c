"""Runs one engine step on the model: flat varlen inputs in, one sampled token per finished row out.

Builds what models/ needs through the attention-backend interface: token ids (or, when image
tokens are in the batch, embeddings with the encoder's rows scattered in plus the DeepStack
rows), positions ([3, T] M-RoPE for VL models, [T] otherwise) and AttentionMetadata with the
paged KV cache's slots and block tables.

Legend: T tokens in the step, B sequences, H hidden, k DeepStack levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from language_server.engine.request import EngineRequest
from language_server.engine.sampler import sample
from language_server.protocol import TokenLogprob
from models.attention import AttentionMetadata, PagedKVCache, TorchAttentionBackend
from models.config import ModelConfig, dtype_from_name
from models.loader import load_model
from models.multimodal import scatter_vision_rows

_CPU_KV_BYTES = 1 << 30  # default KV budget without a GPU


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
                 num_kv_blocks: int | None, kv_memory_fraction: float) -> None:
        self.device = torch.device(device)
        self.dtype = dtype_from_name(dtype)
        loaded = load_model(model_dir, part="language", device=self.device, dtype=self.dtype)
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        text = self.config.text
        self.block_size = block_size
        per_block = 2 * text.num_hidden_layers * block_size * text.num_key_value_heads * text.head_dim \
            * self.dtype.itemsize
        if num_kv_blocks is None:
            num_kv_blocks = max(1, self._kv_budget_bytes(kv_memory_fraction) // per_block)
        self.kv_cache = PagedKVCache(text.num_hidden_layers, num_kv_blocks, block_size, text.num_key_value_heads,
                                     text.head_dim, self.dtype, self.device)
        self.attn = TorchAttentionBackend(self.kv_cache)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def _kv_budget_bytes(self, fraction: float) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * fraction)
        return _CPU_KV_BYTES

    @torch.no_grad()
    def run(self, chunks: Sequence[ScheduledChunk]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Compute the chunks' tokens; sample for every chunk that reaches its sequence's end."""
        ids = torch.tensor([t for c in chunks for t in c.request.token_ids[c.start : c.start + c.count]])
        positions = torch.cat([self._positions(c) for c in chunks], dim=-1)
        meta = self._metadata(chunks)
        ids = ids.to(self.device)
        positions = positions.to(self.device)
        rows = self._image_rows(chunks)
        if rows is None:
            hidden = self.model(positions, self.attn, meta, input_ids=ids)
        else:
            embeds, deepstack = scatter_vision_rows(self.model.model.embed_tokens(ids),
                                                    ids == self.config.image_token_id, rows)
            hidden = self.model(positions, self.attn, meta, inputs_embeds=embeds, input_deepstack_embeds=deepstack)
        ends = torch.tensor([sum(c.count for c in chunks[: i + 1]) - 1 for i, c in enumerate(chunks) if c.samples],
                            device=self.device, dtype=torch.long)
        if ends.numel() == 0:
            return [], []
        logits = self.model.compute_logits(hidden[ends])
        return sample(logits, [c.request for c in chunks if c.samples])

    def _positions(self, chunk: ScheduledChunk) -> torch.Tensor:
        req, a, n = chunk.request, chunk.start, chunk.count
        if req.positions is None:
            return torch.arange(a, a + n)
        # Prompt tokens have precomputed M-RoPE positions; generated ones are index + delta.
        prompt = req.positions[:, a : min(a + n, req.num_prompt_tokens)]
        tail_start = max(a, req.num_prompt_tokens)  # a chunk inside the prompt has no tail
        tail = torch.arange(tail_start, max(tail_start, a + n)).expand(3, -1) + req.rope_delta
        return torch.cat([prompt, tail], dim=1)

    def _metadata(self, chunks: Sequence[ScheduledChunk]) -> AttentionMetadata:
        bs = self.block_size
        slots = [c.request.block_ids[i // bs] * bs + i % bs for c in chunks for i in range(c.start, c.start + c.count)]
        width = max(len(c.request.block_ids) for c in chunks)
        tables = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, c in enumerate(chunks):
            tables[row, : len(c.request.block_ids)] = torch.tensor(c.request.block_ids)
        return AttentionMetadata(
            query_lens=[c.count for c in chunks],
            context_lens=[c.start + c.count for c in chunks],
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
        )

    def _image_rows(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor | None:
        """The encoder rows of the image tokens in this step, in batch order; None if none."""
        parts = []
        for c in chunks:
            req = c.request
            if req.image_rows is None or c.start >= req.num_prompt_tokens:
                continue
            end = min(c.start + c.count, req.num_prompt_tokens)
            first, last = req.image_row_start[c.start], req.image_row_start[end]
            if last > first:
                parts.append(req.image_rows[first:last])
        return torch.cat(parts) if parts else None
