"""Building blocks shared by the text models: RMSNorm, rotary tables, the dense MLP (the
norm kernels themselves come from the step's OpsImpl: models/ops.py's references, or fused GPU
kernels).

Legend: T tokens, H hidden, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import OpsImpl


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
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
