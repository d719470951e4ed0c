"""The decoder layer's small ops: torch references here, fused GPU kernels
in models/kernels/fused_ops.py.

At one decode token a layer's weights stream in ~30 us, while the norms, rotary, routing and
residual adds written as plain torch are ~45 tiny kernels of 2-5 us each (docs/kernels.md has
the profile). Each op below is one kernel on the GPU. The references define the numerics, and
they are transformers' (each bf16 intermediate rounded where transformers rounds it), so a fused
kernel that mimics the roundings gives the same tokens.

    rms_norm(x, w, eps)                      w * (x / rms(x)), normalised in fp32
    add_rms_norm(x, residual, w, eps)        (rms_norm(x + residual), x + residual)
    qk_norm_rope(q, k, qw, kw, eps, cos, sin, v, kv_write)
                                             per-head RMSNorm of q and k (when qw/kw are given),
                                             then rotary, as the attention layer does; with
                                             kv_write, k and v are stored in the KV cache too
    route(logits, top_k, normalize)          softmax in fp32, top-k, optional renormalisation

The norms form an `OpsImpl`, which the step's ForwardContext carries (TORCH_OPS, or
models.kernels.FUSED_OPS, as models/backends.py chose); the attention backend calls its own
qk_norm_rope and the MoE backend its own route, so two models in one process can differ.

Legend: T tokens, H hidden, Hq/Hkv heads, D head dim, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVWrite:
    """Where a layer's new keys and values go: qk_norm_rope stores k and v there (the GPU kernel
    in place, fused with rotary). PagedKVCache.target makes one."""

    k_cache: torch.Tensor  # [N*S, Hkv, D] view of the layer's keys
    v_cache: torch.Tensor  # [N*S, Hkv, D]
    slots: torch.Tensor  # [T] slot of each new token

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_cache.index_copy_(0, self.slots, k)
        self.v_cache.index_copy_(0, self.slots, v)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the weight, as the reference does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def torch_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual  # rounded to x's dtype, as transformers' `hidden = residual + hidden`
    return torch_rms_norm(summed, weight, eps), summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def torch_qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_write: KVWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] -> both normalised per head (Qwen3) and rotated. With
    `kv_write`, the rotated k and `v` [T, Hkv, D] are also stored at their cache slots."""
    if q_weight is not None:
        q, k = torch_rms_norm(q, q_weight, eps), torch_rms_norm(k, k_weight, eps)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv_write is not None:
        kv_write.write(k, v)
    return q, k


def torch_route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, K] in the logits' dtype, expert ids [T, K] int64)."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


@dataclass(frozen=True)
class OpsImpl:
    """The norms a step runs (q/k norm + rotary belong to the attention backend, routing to the
    MoE backend)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


TORCH_OPS = OpsImpl(torch_rms_norm, torch_add_rms_norm)


__all__ = [
    "OpsImpl",
    "TORCH_OPS",
    "apply_rotary",
    "torch_add_rms_norm",
    "torch_qk_norm_rope",
    "torch_rms_norm",
    "torch_route",
]
