"""FP8 weights kept FP8 on the GPU: the module that holds an FP8 linear, and turning a built
model's modules into FP8 ones before their weights are filled.

Qwen's FP8 checkpoints quantize the language model's attention projections and every expert (a
shared expert's projections too; models/fp8.py has the format). On a GPU the loader keeps those
weights as they are stored, FP8 bytes with fp32 block scales (half the bytes of bf16), and they
run through the FP8 kernels (models/kernels/fp8_linear.py; the fused MoE's FP8 path). On a CPU,
and across tensor-parallel ranks for now, the loader dequantizes them instead.

A converted module keeps its parameter names and adds `<weight>_scale_inv` beside each FP8
weight, the checkpoint's own names, so filling and state_dict stay name for name.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from models import fp8
from models.kernels.fp8_linear import fp8_linear

# The modules Qwen's FP8 releases quantize (the rest stay in the model dtype); random FP8 models
# (load_format dummy) quantize these.
FP8_MODULES = re.compile(r"\.self_attn\.[qkvo]_proj$|\.mlp\.experts$|\.mlp\.shared_expert\.(gate|up|down)_proj$")


def _frozen(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Fp8Linear(nn.Module):
    """y = x @ (weight * block scales)^T + bias, the weight FP8 [out, in] with an fp32 scale grid."""

    def __init__(
        self, in_features: int, out_features: int, bias_dtype: torch.dtype | None, device: torch.device
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen((out_features, in_features), fp8.FP8_DTYPE, device)
        self.weight_scale_inv = _frozen(fp8.scale_grid((out_features, in_features)), torch.float32, device)
        self.bias = None if bias_dtype is None else _frozen((out_features,), bias_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)


def experts_to_fp8(experts: nn.Module, device: torch.device) -> None:
    """Give an Experts module FP8 gate_up [E, 2I, H] and down [E, H, I] with their scale grids
    (gate_up's: the gate's grid rows, then the up's, as models/fp8.quantize_experts lays them out)."""
    e, two_inter, hidden = experts.gate_up_proj.shape
    inter = two_inter // 2
    gate_rows, hidden_cols = fp8.scale_grid((inter, hidden))
    experts.gate_up_proj = _frozen((e, two_inter, hidden), fp8.FP8_DTYPE, device)
    experts.gate_up_proj_scale_inv = _frozen((e, 2 * gate_rows, hidden_cols), torch.float32, device)
    experts.down_proj = _frozen((e, hidden, inter), fp8.FP8_DTYPE, device)
    experts.down_proj_scale_inv = _frozen((e, *fp8.scale_grid((hidden, inter))), torch.float32, device)


def make_fp8(model: nn.Module, names: set[str], device: torch.device) -> None:
    """Turn each named module (a Linear or an Experts) into its FP8 form, its weights unfilled."""
    for name in sorted(names):
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            bias = None if module.bias is None else module.bias.dtype
            setattr(
                model.get_submodule(parent_name), attr, Fp8Linear(module.in_features, module.out_features, bias, device)
            )
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            experts_to_fp8(module, device)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}; only linear layers and experts hold FP8 weights")


@torch.no_grad()
def quantize_modules(model: nn.Module, names: set[str]) -> None:
    """Quantize filled modules in place into their FP8 form (random models: the checkpoint's
    layout without a checkpoint)."""
    for name in sorted(names):
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        if isinstance(module, nn.Linear):
            weight, bias = module.weight, module.bias
            make_fp8(model, {name}, device)
            target = model.get_submodule(name)
            q, s = fp8.quantize(weight.float())
            target.weight.copy_(q)
            target.weight_scale_inv.copy_(s)
            if bias is not None:
                target.bias.copy_(bias)
        else:
            gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
            experts_to_fp8(module, device)
            q, s = fp8.quantize_experts(gate_up.float(), gate_up=True)
            module.gate_up_proj.copy_(q)
            module.gate_up_proj_scale_inv.copy_(s)
            q, s = fp8.quantize_experts(down.float())
            module.down_proj.copy_(q)
            module.down_proj_scale_inv.copy_(s)


def fp8_module_names(model: nn.Module) -> set[str]:
    """The modules of `model` that Qwen's FP8 releases quantize."""
    return {name for name, _ in model.named_modules() if FP8_MODULES.search("." + name)}


def weights_description(model: nn.Module, dtype: torch.dtype) -> str:
    """What the weights are, for logs and /v1/models: "bfloat16", or "fp8 (N tensors, block
    128x128) + bfloat16" when some stay FP8."""
    kept = sum(1 for p in model.parameters() if p.dtype == fp8.FP8_DTYPE)
    plain = str(dtype).removeprefix("torch.")
    return f"fp8 ({kept} tensors, block {fp8.BLOCK[0]}x{fp8.BLOCK[1]}) + {plain}" if kept else plain
