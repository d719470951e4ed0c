"""The MoE kernels' interface and references: `MoeBackend` (routing + experts) and the torch one.

The MoE block (models/qwen2_moe.py) takes its routing and expert arithmetic from the step's
`MoeBackend` (ctx.kernels.moe): TORCH_MOE here, or the Triton kernels (models/kernels/fused_moe.py),
chosen by name in models/backends.py.

In-memory expert layout (the same as transformers 5.x and vLLM's w13/w2):
  gate_up_proj [E, 2I, H]  (rows 0..I-1 gate, I..2I-1 up)
  down_proj    [E, H, I]
Legend: T tokens, H hidden, E experts, I expert intermediate, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.fp8 import dequantize_experts
from models.ops import torch_route

# (x, gate_up_proj, down_proj, topk_weights, topk_ids, skip_foreign=False, scales=None); `scales`:
# the experts are block-wise FP8 with these grids (models/fp8_layers.py)
ExpertsFn = Callable[..., torch.Tensor]


def torch_fused_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    skip_foreign: bool = False,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference experts: x [T, H] -> sum_k w[t,k] * expert_{id[t,k]}(x[t]), [T, H].

    `skip_foreign` (expert parallelism): an id equal to E names an expert of another rank, whose
    term is left out. `scales`: FP8 experts, dequantized here (the reference's way; the Triton
    kernels read the FP8 bytes). Groups tokens by expert (one sort), so each active expert runs
    one matmul over its tokens.
    """
    if scales is not None:
        gate_up_proj = dequantize_experts(gate_up_proj, scales[0], x.dtype, gate_up=True)
        down_proj = dequantize_experts(down_proj, scales[1], x.dtype)
    num_tokens, top_k = topk_ids.shape
    num_experts = gate_up_proj.shape[0]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    # Foreign ids (== E) sort last, so the loop below ends before them.
    counts = torch.bincount(flat_ids, minlength=num_experts + skip_foreign).tolist()[:num_experts]
    token_of = order // top_k  # which token each sorted (token, k) pair belongs to
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        tokens = token_of[start : start + count]
        start += count
        gate, up = F.linear(x[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down_proj[expert])
        y = y * topk_weights.reshape(-1)[pairs, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


@dataclass(frozen=True)
class MoeBackend:
    name: str
    route: Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]  # logits -> (weights, ids)
    experts: ExpertsFn
    graph_capturable: bool  # no host sync inside, so a CUDA graph can hold it


# The reference experts read per-expert counts on the host, so they cannot be captured.
TORCH_MOE = MoeBackend("torch", torch_route, torch_fused_experts, graph_capturable=False)
