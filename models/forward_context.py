"""The per-step forward context: everything one forward of a language model reads besides its
weights and token ids, built once by whoever runs the model (the engine's runner, the offline
generator, tests) before the forward.

Layers take `(hidden, ctx)` and read what they need here: the kernels (attention backend with its
KV cache, small ops, experts; models/backends.py picks them by name), the step's attention
metadata with its device tensors, positions, and the image rows the deepstack models scatter in.
Nothing is derived lazily in a layer or a backend, and nothing comes from a module global, so two
models in one process (or one model under two backends, as tests do) never interfere.

Legend: T tokens in the step, N image rows, H hidden, k DeepStack levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention import AttentionBackend, AttentionBatch, BatchKind
from models.moe import TORCH_MOE, MoeBackend
from models.ops import TORCH_OPS, OpsImpl


@dataclass(frozen=True)
class Kernels:
    """The implementations one model runs on, chosen once (models/backends.py)."""

    attn: AttentionBackend  # owns the KV cache, rotary + KV write, attention, graph buffers
    ops: OpsImpl = TORCH_OPS  # the norms (they ride with the attention backend's family)
    moe: MoeBackend = TORCH_MOE  # routing and experts

    @property
    def graph_capturable(self) -> bool:
        return self.attn.graph_capturable and self.moe.graph_capturable

    def describe(self) -> str:
        return f"attention={self.attn.name} moe={self.moe.name}"


@dataclass
class ForwardContext:
    kernels: Kernels
    batch: AttentionBatch  # from kernels.attn.prepare(...) or a graph hook
    positions: torch.Tensor  # [T] (1-D RoPE) or [3, T] (M-RoPE t, h, w) on the device
    image_mask: torch.Tensor | None = None  # [T] bool: positions that take an image row
    image_rows: torch.Tensor | None = None  # [N, H·(1+k)] encoder rows in batch order (N = mask.sum())
    graph_bucket: int | None = None  # padded batch size when this forward is a decode graph's body

    @property
    def kind(self) -> BatchKind:
        return self.batch.kind

    @property
    def attn(self) -> AttentionBackend:
        return self.kernels.attn

    @property
    def ops(self) -> OpsImpl:
        return self.kernels.ops


def forward_context(
    kernels: Kernels,
    positions: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int] | None = None,
    slot_mapping: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    image_rows: torch.Tensor | None = None,
) -> ForwardContext:
    """A context for one eager step; `context_lens` defaults to the query lengths (whole prompts)."""
    context_lens = list(query_lens) if context_lens is None else context_lens
    batch = kernels.attn.prepare(list(query_lens), list(context_lens), slot_mapping, block_tables)
    return ForwardContext(kernels, batch, positions, image_mask, image_rows)


def prefill_context(
    kernels: Kernels, seq_lens: list[int], device: torch.device | str = "cpu", positions: torch.Tensor | None = None
) -> ForwardContext:
    """Whole sequences, no cache (parity tests, the reference model): positions 0.. per sequence
    unless given."""
    if positions is None:
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(device)
    return forward_context(kernels, positions, seq_lens)
