"""Kernel backends by name: what `attention_backend` and `moe_backend` settings choose.

    attention  torch   TorchAttentionBackend (SDPA per sequence), torch norms
               triton  TritonAttentionBackend (paged decode, flash varlen, fused rotary + KV
                       store), fused norms
    moe        torch   torch routing and per-expert matmuls
               triton  fused routing and grouped-GEMM experts
    auto       triton on CUDA when triton imports, else torch; resolved once at start

The kernels import triton, which CPU installs may lack, so they are imported only when chosen.
"""

from __future__ import annotations

import torch

from models.attention import PagedKVCache, TorchAttentionBackend
from models.forward_context import Kernels
from models.moe import TORCH_MOE
from models.ops import TORCH_OPS

BACKEND_NAMES = ("auto", "torch", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """ "auto" -> the backend that runs best on `device`; a named one is checked and kept."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    from models.kernels.availability import HAS_TRITON

    if name == "triton" and not HAS_TRITON:
        raise ValueError("the triton backend needs triton (pip install triton)")
    if name == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    return name


def select_kernels(attention: str, moe: str, kv_cache: PagedKVCache | None, device: torch.device) -> Kernels:
    """The Kernels of one model on `device`; names as in the module docstring."""
    attention, moe = resolve_backend(attention, device), resolve_backend(moe, device)
    if attention == "triton":
        from models.kernels import FUSED_OPS, TritonAttentionBackend

        attn, ops = TritonAttentionBackend(kv_cache, device), FUSED_OPS
    else:
        attn, ops = TorchAttentionBackend(kv_cache, device), TORCH_OPS
    if moe == "triton":
        from models.kernels import TRITON_MOE

        moe_backend = TRITON_MOE
    else:
        moe_backend = TORCH_MOE
    return Kernels(attn=attn, ops=ops, moe=moe_backend)


def torch_kernels(kv_cache: PagedKVCache | None = None) -> Kernels:
    """The torch references: what the parity tests and the offline generator run."""
    return Kernels(attn=TorchAttentionBackend(kv_cache))
