"""GPU kernels (Triton) behind the `triton` backends of models/backends.py, with torch fallbacks.

  attention: TritonAttentionBackend (paged decode, flash varlen prefill, fused rotary + KV store)
  MoE:       TRITON_MOE (fused routing, two grouped GEMMs)
  norms:     FUSED_OPS (RMSNorm and the residual add fused with it)

Without CUDA (and outside TRITON_INTERPRET=1) every function here calls the torch reference, so
each backend is safe on any machine. The vision tower's kernels (vision_ops.py) need no choice:
each checks where its tensors live. docs/kernels.md has the design and the performance notes.
"""

from models.kernels.attention_backend import TritonAttentionBackend
from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.fused_moe import (
    TRITON_MOE,
    MoeConfig,
    moe_config,
    triton_fused_experts,
)
from models.kernels.fused_ops import FUSED_OPS
from models.kernels.paged_attention import paged_decode_attention

__all__ = [
    "FUSED_OPS",
    "HAS_TRITON",
    "TRITON_MOE",
    "MoeConfig",
    "TritonAttentionBackend",
    "moe_config",
    "paged_decode_attention",
    "triton_fused_experts",
    "use_triton",
]
