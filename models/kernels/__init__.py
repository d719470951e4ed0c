"""GPU kernels (Triton) behind the model's three swap points, with torch fallbacks elsewhere.

  experts:   models.moe.set_experts_impl(triton_fused_experts)
  attention: pass TritonAttentionBackend(kv_cache) where a TorchAttentionBackend would go
  small ops: models.ops.set_ops_impl(FUSED_OPS)   (norms, q/k norm + rotary, routing)

Without CUDA (and outside TRITON_INTERPRET=1) every function here calls the torch reference, so
every switch is safe on any machine. The vision tower's kernels (vision_ops.py) need no switch: each
checks where its tensors live. docs/kernels.md has the design and the performance notes.
"""

from models.kernels.attention_backend import TritonAttentionBackend
from models.kernels.availability import HAS_TRITON, use_triton
from models.kernels.fused_moe import MoeConfig, moe_config, triton_fused_experts
from models.kernels.fused_ops import FUSED_OPS
from models.kernels.paged_attention import paged_decode_attention

__all__ = [
    "FUSED_OPS",
    "HAS_TRITON",
    "MoeConfig",
    "TritonAttentionBackend",
    "moe_config",
    "paged_decode_attention",
    "triton_fused_experts",
    "use_triton",
]
