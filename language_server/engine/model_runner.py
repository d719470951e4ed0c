"""Runs one engine step on the model: flat varlen inputs in, one sampled token per finished row out.

A step is planned, then executed. `plan` reads the scheduled requests and writes the step's
inputs on the host (step_plan.py); `execute` runs that plan on this rank's model. With tensor
parallelism rank 0 plans, hands the plan to the other ranks (ranks.py), and every rank executes
it on its shard; only rank 0 samples. From the plan the runner builds the step's ForwardContext (models/forward_context.py): the
positions ([3, T] M-RoPE for VL models, [T] otherwise), the attention metadata its backend
prepares from the paged KV cache's slots and block tables, and, when image tokens are in the
step, the encoder's rows with the mask of the positions they go to. The model embeds and
scatters them itself.

Kernels are chosen by name once, at start (models/backends.py; `attention_backend` and
`moe_backend`, "auto" = Triton on CUDA). Decode-only steps replay CUDA graphs (cuda_graphs.py)
when the backends can be captured; prefill and mixed steps run eagerly.

Legend: T tokens in the step, B sequences, H hidden, k DeepStack levels, V vocab.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from language_server.engine.cuda_graphs import DecodeGraphRunner, DecodeStep
from language_server.engine.request import EngineRequest
from language_server.engine.sampler import sample
from language_server.engine.step_plan import EagerStep, StepPlan
from language_server.protocol import TokenLogprob
from language_server.settings import LanguageSettings
from models.attention import PagedKVCache
from models.backends import select_kernels
from models.config import ModelConfig, dtype_from_name
from models.device import resolve_device
from models.forward_context import forward_context
from models.fp8_layers import weights_description
from models.kernels.fp8_linear import fp8_kernels_run_on
from models.loader import load_model
from models.mrope import generated_positions
from models.parallel import SINGLE, TensorParallel
from models.random_weights import random_language_model

log = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30  # default KV budget without a GPU


@dataclass(frozen=True)
class RunnerOptions:
    """How the runner executes: the engine settings of the same names (language_server/settings.py)."""

    attention_backend: str = "auto"  # "auto" (triton on CUDA), "torch", "triton"
    moe_backend: str = "auto"
    cuda_graphs: str = "on"  # "on": decode graphs when the backends capture; "off"; "nocapture": the
    # graph path's static buffers run eagerly (any device; separates capture bugs from padding bugs)
    load_format: str = "safetensors"  # "dummy": random weights drawn on the device, config.json only
    max_num_seqs: int = 256  # largest decode batch with a graph
    max_model_len: int = 8192  # sets the graphs' block-table width; longer sequences decode eagerly

    CHOICES = {"cuda_graphs": ("on", "off", "nocapture"), "load_format": ("safetensors", "dummy")}

    def __post_init__(self) -> None:
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")

    @classmethod
    def of(cls, settings: LanguageSettings) -> RunnerOptions:
        # Graphs are captured up to the largest decode batch and sized for the longest sequence.
        return cls(
            attention_backend=settings.attention_backend,
            moe_backend=settings.moe_backend,
            cuda_graphs=settings.cuda_graphs,
            load_format=settings.load_format,
            max_num_seqs=settings.max_num_seqs,
            max_model_len=settings.max_model_len,
        )


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
    def __init__(
        self,
        model_dir: str,
        device: str,
        dtype: str,
        block_size: int,
        num_kv_blocks: int | None,
        kv_memory_fraction: float,
        options: RunnerOptions | None = None,
        tp: TensorParallel = SINGLE,
        around_step: Callable[[StepPlan], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.options = options or RunnerOptions()
        self.device = resolve_device(device)  # a GPU is made current: the engine process works on one
        self.dtype = dtype_from_name(dtype)
        self.tp = tp
        # Rank 0 of several: wraps each forward, handing its plan to the other ranks (ranks.py).
        self.around_step = around_step
        # FP8 checkpoints stay FP8 on a GPU that runs the FP8 kernels, at one rank; elsewhere
        # they are dequantized at load.
        keep_fp8 = tp.size == 1 and fp8_kernels_run_on(self.device)
        if self.options.load_format == "dummy":
            loaded = random_language_model(model_dir, self.device, self.dtype, tp=tp, keep_fp8=keep_fp8)
        else:
            loaded = load_model(
                model_dir, part="language", device=self.device, dtype=self.dtype, tp=tp, keep_fp8=keep_fp8
            )
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        text = self.config.text
        self.block_size = block_size
        kv_heads = tp.kv_heads(text.num_key_value_heads)[1]  # this rank's share (or its replica)
        per_block = 2 * text.num_hidden_layers * block_size * kv_heads * text.head_dim * self.dtype.itemsize
        if num_kv_blocks is None:
            num_kv_blocks = max(1, self._kv_budget_bytes(kv_memory_fraction) // per_block - 1)
            # One scheduler hands out blocks for every rank: the rank with the least room decides.
            num_kv_blocks = tp.min_over_ranks(num_kv_blocks)
        self.num_kv_blocks = num_kv_blocks
        # One block more than the scheduler hands out: padding rows of graph steps write there.
        self.kv_cache = PagedKVCache(
            text.num_hidden_layers,
            num_kv_blocks + 1,
            block_size,
            kv_heads,
            text.head_dim,
            self.dtype,
            self.device,
        )
        opts = self.options
        self.kernels = select_kernels(opts.attention_backend, opts.moe_backend, self.kv_cache, self.device)
        if self.kernels.attn.name == "triton":
            self.model.fuse_qkv()  # one GEMM for q, k and v
        self.decode_graphs = self._decode_graphs()
        self.weights = weights_description(self.model, self.dtype)
        log.info(
            "kernels: %s, cuda_graphs=%s (%s), load_format=%s, weights %s",
            self.kernels.describe(),
            opts.cuda_graphs,
            "captured" if self.decode_graphs is not None and self.decode_graphs.graphs else "not captured",
            opts.load_format,
            self.weights,
        )

    def _kv_budget_bytes(self, fraction: float) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * fraction)
        return _CPU_KV_BYTES

    def _decode_graphs(self) -> DecodeGraphRunner | None:
        mode = self.options.cuda_graphs
        capture = mode == "on" and self.device.type == "cuda" and self.kernels.graph_capturable
        if not capture and mode != "nocapture":
            return None
        return DecodeGraphRunner(
            self.model,
            self.kernels,
            max_batch=self.options.max_num_seqs,
            max_blocks=-(-self.options.max_model_len // self.block_size),
            scratch_block=self.num_kv_blocks,
            mrope=self.config.is_vl,
            capture=capture,
        )

    @torch.no_grad()
    def run(self, chunks: Sequence[ScheduledChunk]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Compute the chunks' tokens; sample for every chunk that reaches its sequence's end.
        With tensor parallelism the plan goes to the other ranks first (around_step), and they
        run the same forward on their shards; only this rank samples."""
        plan = self.plan(chunks)
        if self.around_step is None:
            logits = self.execute(plan)
        else:
            with self.around_step(plan):
                logits = self.execute(plan)
        if logits is None:
            return [], []
        return sample(logits, [c.request for c in chunks if c.samples])

    def plan(self, chunks: Sequence[ScheduledChunk]) -> StepPlan:
        """The step's inputs on the host, from the requests (step_plan.py)."""
        if self._graph_step(chunks):
            rows = None if all(c.samples for c in chunks) else [i for i, c in enumerate(chunks) if c.samples]
            return StepPlan(self._decode_step(chunks), rows)
        ends, end = [], 0
        for c in chunks:
            end += c.count
            if c.samples:
                ends.append(end - 1)
        return StepPlan(self._eager_step(chunks), ends)

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Logits [n, V] of the plan's sample rows; None if it has none. Every rank runs this."""
        step = plan.step
        if isinstance(step, DecodeStep):
            logits = self.decode_graphs.run(step)  # [B, V]
            if plan.sample_rows is None:
                return logits
            return logits[torch.tensor(plan.sample_rows, device=self.device)] if plan.sample_rows else None
        dev = self.device
        ctx = forward_context(
            self.kernels,
            step.positions.to(dev),
            step.query_lens,
            step.context_lens,
            step.slots.to(dev),
            step.block_tables.to(dev),
            image_mask=None if step.image_mask is None else step.image_mask.to(dev),
            image_rows=step.image_rows,
        )
        hidden = self.model(step.token_ids.to(dev), ctx)
        if not plan.sample_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(plan.sample_rows, device=dev)])

    # ----- decode steps on the graph path ---------------------------------------------------

    def _graph_step(self, chunks: Sequence[ScheduledChunk]) -> bool:
        graphs = self.decode_graphs
        if graphs is None or not graphs.fits(len(chunks), 0):
            return False
        longest = 0
        for c in chunks:
            req = c.request
            if c.count != 1 or (req.image_rows is not None and c.start < req.num_prompt_tokens):
                return False  # a prompt chunk, or possibly an image token: the eager path
            longest = max(longest, c.start)
        return graphs.fits(len(chunks), longest // self.block_size + 1)

    def _decode_step(self, chunks: Sequence[ScheduledChunk]) -> DecodeStep:
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

    def _eager_step(self, chunks: Sequence[ScheduledChunk]) -> EagerStep:
        """Token ids, positions, attention metadata and image rows of an eager step."""
        ids = torch.tensor([t for c in chunks for t in c.request.token_ids[c.start : c.start + c.count]])
        slots, tables = self._slots_and_tables(chunks)
        vision = self._vision_inputs(chunks)
        mask, rows = vision if vision is not None else (None, None)
        return EagerStep(
            token_ids=ids,
            positions=torch.cat([self._positions(c) for c in chunks], dim=-1),
            query_lens=[c.count for c in chunks],
            context_lens=[c.start + c.count for c in chunks],
            slots=slots,
            block_tables=tables,
            image_mask=mask,
            image_rows=rows,
        )

    def _positions(self, chunk: ScheduledChunk) -> torch.Tensor:
        req, a, n = chunk.request, chunk.start, chunk.count
        if req.positions is None:
            return torch.arange(a, a + n)
        # Prompt tokens have precomputed M-RoPE positions; generated ones are index + delta.
        prompt = req.positions[:, a : min(a + n, req.num_prompt_tokens)]
        tail = generated_positions(max(a, req.num_prompt_tokens), a + n, req.rope_delta)  # empty inside the prompt
        return torch.cat([prompt, tail], dim=1)

    def _slots_and_tables(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] cache slot of each new token, [B, W] block table of each sequence, on the host."""
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
        return torch.tensor(slots, dtype=torch.long), torch.from_numpy(tables)

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
        return torch.cat(masks), torch.cat(parts)


def build_runner(
    settings: LanguageSettings,
    device: str,
    tp: TensorParallel = SINGLE,
    around_step: Callable[[StepPlan], AbstractContextManager[None]] | None = None,
) -> ModelRunner:
    """The runner the settings describe, for the rank on `device` (every rank builds the same)."""
    return ModelRunner(
        settings.model,
        device,
        settings.dtype,
        settings.block_size,
        settings.num_kv_blocks,
        settings.kv_cache_memory_fraction,
        RunnerOptions.of(settings),
        tp,
        around_step,
    )
