"""Qwen's block-wise FP8 checkpoints: what the format is, which settings we accept, and the
block arithmetic (dequantize at load, quantize for test checkpoints).

The format, as Qwen ships it (Qwen3-30B-A3B-FP8, Qwen3-VL-30B-A3B-Instruct-FP8; the model cards
say "fine-grained fp8 quantization with block size of 128", e.g.
huggingface.co/Qwen/Qwen3-VL-4B-Instruct-FP8) and as vLLM and transformers read it:
- config.json has a top-level `quantization_config` (also for the VL checkpoints: it sits beside
  `text_config` and `vision_config`, not inside them):
  `{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128], "modules_to_not_convert": [...] or null}`. vLLM's
  `Fp8Config.from_config` (vllm/model_executor/layers/quantization/fp8.py) reads quant_method,
  activation_scheme, weight_block_size and the skip-list under `ignored_layers`; transformers'
  `FineGrainedFP8Config` (utils/quantization_config.py) reads the same keys, takes
  `ignored_layers` as an alias of `modules_to_not_convert`, and adds `scale_fmt` ("float" or
  DeepSeek-V4's "ue8m0" exponent bytes) and `expert_dtype` ("fp8" or "fp4"); those two change
  what the bytes mean, so only their defaults are accepted here.
- A quantized linear's `<module>.weight` is `float8_e4m3fn` [out, in] and `<module>.weight_scale_inv`
  is a float grid [ceil(out/128), ceil(in/128)] (vLLM's `BlockQuantScaleParameter` shape;
  `weight_block_size` is [block over out, block over in]). Despite the name, the value is the
  multiplier: W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128], with partial blocks at the
  right and bottom edges. vLLM's block kernels and transformers' `Fp8Dequantize` both multiply.
  Qwen's files store the grid in float32 or bfloat16 (Qwen3 dense FP8 releases ship bf16 scales:
  HabanaAI/vllm-fork#2141, modular/modular#7142; one Qwen3-4B release even fp16, InternLM/lmdeploy
  #4276), so any float dtype is read and widened to float32.
- What is quantized: the language model's attention projections (q/k/v/o) and every expert's
  gate/up/down, stored one expert at a time (`mlp.experts.{j}.{gate,up,down}_proj.weight`), plus a
  shared expert's projections where a model has one. Unquantized (their modules_to_not_convert):
  embeddings, lm_head, norms, the router `mlp.gate`, the shared-expert gate and the whole vision
  tower. The tensors' own dtypes say which is which, so the skip-list only has to be well formed.
- `activation_scheme: dynamic`: the checkpoint holds no activation scales (FP8 kernels quantize
  activations per token group at run time); "static" would add `input_scale` tensors.

transformers 5 on CPU (no FP8 GPU) loads these files by dequantizing to bf16, but it needs
accelerate and derives the block size from the weight / grid ratio, which is wrong for a grid with
partial edge blocks (e.g. 200 rows in two blocks: 100 + 100 instead of 128 + 72); so it is not our
reference, dequantized plain checkpoints are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # `...q_proj.weight` -> `...q_proj.weight_scale_inv`
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Every float8 flavour torch knows, so a checkpoint in another one is refused, not cast blindly.
FLOAT8_DTYPES = frozenset(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n)
)

# Keys of quantization_config and the values we serve. Keys that only steer how a loader places
# weights (transformers' runtime `dequantize`, the skip-lists) are accepted as they come.
_DEFAULTS = {
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "scale_fmt": "float",
    "expert_dtype": "fp8",
}
_WHY = {
    "quant_method": "splitvl loads unquantized checkpoints and Qwen's block-wise FP8 ones (quant_method 'fp8')",
    "fmt": "only float8 e4m3 weights are read",
    "activation_scheme": "only dynamic activations (no activation scales in the checkpoint) are supported",
    "scale_fmt": "only float block scales are read (not ue8m0 exponent bytes)",
    "expert_dtype": "experts must be fp8 like the other linear weights",
}
_PLACEMENT_KEYS = {"modules_to_not_convert", "ignored_layers", "dequantize", "modules_to_convert"}


@dataclass(frozen=True)
class Fp8Config:
    """A validated `quantization_config`: block-wise FP8 e4m3, dynamic activations, 128x128."""

    weight_block_size: tuple[int, int] = BLOCK
    modules_to_not_convert: tuple[str, ...] = ()


def parse_quantization_config(raw: Any) -> Fp8Config | None:
    """`quantization_config` from config.json -> Fp8Config (None: not quantized). Raises ValueError
    naming the setting for anything that would make dequantized weights wrong."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config must be a mapping, got {type(raw).__name__}")
    if raw.get("quant_method") != "fp8":  # first: another method's keys are all "unknown" here
        raise ValueError(
            f"quantization_config quant_method={raw.get('quant_method')!r} is not supported: {_WHY['quant_method']}"
        )
    unknown = sorted(set(raw) - set(_DEFAULTS) - _PLACEMENT_KEYS - {"quant_method", "weight_block_size"})
    if unknown:
        raise ValueError(
            f"quantization_config has settings splitvl does not know: {', '.join(unknown)}; they may change "
            "what the weights mean, so the checkpoint is refused rather than read wrongly"
        )
    for key, want in _DEFAULTS.items():
        value = raw.get(key, want)
        if isinstance(value, str):
            value = value.lower()
        if value != want:
            raise ValueError(f"quantization_config {key}={raw.get(key)!r} is not supported: {_WHY[key]}")
    block = raw.get("weight_block_size")
    if not isinstance(block, (list, tuple)) or [*block] != [*BLOCK]:
        raise ValueError(
            f"quantization_config weight_block_size={block!r} is not supported: only Qwen's block-wise "
            f"FP8 with {list(BLOCK)} blocks is (per-tensor or other block sizes are not)"
        )
    if raw.get("modules_to_convert"):
        raise ValueError("quantization_config modules_to_convert (FP8 embeddings) is not supported")
    skip = raw.get("modules_to_not_convert", raw.get("ignored_layers")) or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError("quantization_config modules_to_not_convert must be a list of module names or null")
    return Fp8Config(weight_block_size=BLOCK, modules_to_not_convert=tuple(skip))


def scale_grid(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The scale grid of an [out, in] weight: one scale per block, partial blocks at the edges."""
    out_features, in_features = shape
    return math.ceil(out_features / block[0]), math.ceil(in_features / block[1])


def dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """fp8 [out, in] x per-block scale [ceil(out/bo), ceil(in/bi)] -> `dtype` [out, in].
    The product is taken in float32 and rounded once to `dtype`."""
    if weight.dim() != 2 or tuple(scale_inv.shape) != scale_grid(tuple(weight.shape), block):
        raise ValueError(
            f"scale grid {tuple(scale_inv.shape)} does not fit weight {tuple(weight.shape)} "
            f"in {block[0]}x{block[1]} blocks (expected {scale_grid(tuple(weight.shape), block)})"
        )
    out_features, in_features = weight.shape
    scales = scale_inv.to(torch.float32).repeat_interleave(block[0], 0)[:out_features]
    scales = scales.repeat_interleave(block[1], 1)[:, :in_features]
    return weight.to(torch.float32).mul_(scales).to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (fp8 e4m3 weight, float32 scale_inv grid) with scale = amax(block) / 448,
    the usual block recipe (DeepSeek-V3's and transformers' `Fp8Quantize`)."""
    out_features, in_features = weight.shape
    rows, cols = scale_grid((out_features, in_features), block)
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32, device=weight.device)
    padded[:out_features, :in_features] = weight.to(torch.float32)  # zero padding leaves each amax as it is
    blocks = padded.view(rows, block[0], cols, block[1])
    amax = blocks.abs().amax(dim=(1, 3))  # [rows, cols]
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero block stays zero
    quantized = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.view(rows * block[0], cols * block[1])[:out_features, :in_features].contiguous(), scale


def quantize_experts(weight: torch.Tensor, gate_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float -> (fp8 [E, N, K], float32 grids [E, R, C]), each expert quantized alone.
    `gate_up`: N is a gate half then an up half, quantized apart as the checkpoints store them
    (two [I, H] weights), so the grid is the gate's rows then the up's: 2*ceil(I/128) of them."""
    pairs = [_quantize_halves(w) if gate_up else quantize(w) for w in weight]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def dequantize_experts(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, gate_up: bool = False
) -> torch.Tensor:
    """The inverse of quantize_experts: fp8 [E, N, K] with grids [E, R, C] -> `dtype` [E, N, K]."""
    out = []
    for w, s in zip(weight, scale_inv):
        if gate_up:
            half, rows = w.shape[0] // 2, s.shape[0] // 2
            out.append(torch.cat([dequantize(w[:half], s[:rows], dtype), dequantize(w[half:], s[rows:], dtype)]))
        else:
            out.append(dequantize(w, s, dtype))
    return torch.stack(out)


def _quantize_halves(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = weight.shape[0] // 2
    (qg, sg), (qu, su) = quantize(weight[:half]), quantize(weight[half:])
    return torch.cat([qg, qu]), torch.cat([sg, su])
