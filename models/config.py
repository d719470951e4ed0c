"""Model configuration read from a checkpoint's config.json.

config.json comes in two spellings (DESIGN.md §3): files on the Hub say `num_experts`,
`rope_scaling` + `rope_theta`, `torch_dtype`; transformers 5.x writes `num_local_experts`,
`rope_parameters`, `dtype`. Both parse to the same dataclasses here, so nothing past this file
cares which one a user has on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.fp8 import Fp8Config, parse_quantization_config

# model_type in config.json -> our architecture name.
TEXT_ARCHS = {"qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}
VL_ARCHS = {"qwen3_vl_moe": "qwen3_vl_moe"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model splitvl does not serve."""


@dataclass(frozen=True)
class TextConfig:
    arch: str  # "qwen2_moe", "qwen3_moe" or "qwen3_vl_moe" (the text half)
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None  # interleaved M-RoPE sections (T, H, W); None = 1-D RoPE
    qkv_bias: bool
    qk_norm: bool
    shared_expert_intermediate_size: int  # 0: no shared expert
    tie_word_embeddings: bool
    max_position_embeddings: int

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @property
    def num_deepstack_levels(self) -> int:
        return len(self.deepstack_visual_indexes)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.bfloat16
    quantization: Fp8Config | None = None  # block-wise FP8 checkpoint (models/fp8.py)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_vl(self) -> bool:
        return self.vision is not None


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: point --model at a checkpoint directory with config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type in VL_ARCHS:
        text_raw = dict(raw.get("text_config") or {})
        vision_raw = raw.get("vision_config")
        if not vision_raw:
            raise ConfigError("a qwen3_vl_moe config.json needs a vision_config section")
        text = _parse_text(text_raw, "qwen3_vl_moe", top=raw)
        return ModelConfig(
            arch="qwen3_vl_moe",
            text=text,
            vision=_parse_vision(vision_raw),
            image_token_id=raw.get("image_token_id"),
            video_token_id=raw.get("video_token_id"),
            vision_start_token_id=raw.get("vision_start_token_id"),
            vision_end_token_id=raw.get("vision_end_token_id"),
            eos_token_ids=_as_tuple(text_raw.get("eos_token_id", raw.get("eos_token_id"))),
            dtype=_parse_dtype(text_raw, raw),
            quantization=_parse_quantization(raw, text_raw),
            raw=raw,
        )
    if model_type in TEXT_ARCHS:
        return ModelConfig(
            arch=TEXT_ARCHS[model_type],
            text=_parse_text(raw, TEXT_ARCHS[model_type], top=raw),
            eos_token_ids=_as_tuple(raw.get("eos_token_id")),
            dtype=_parse_dtype(raw, raw),
            quantization=_parse_quantization(raw, raw),
            raw=raw,
        )
    known = ", ".join(sorted({**TEXT_ARCHS, **VL_ARCHS}))
    raise ConfigError(f"model_type {model_type!r} is not served by splitvl (known: {known})")


def _parse_text(c: dict[str, Any], arch: str, top: dict[str, Any]) -> TextConfig:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", c.get("rope_theta"))
    if rope_theta is None:
        raise ConfigError("config.json gives no rope_theta (neither top-level nor in rope_parameters)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only default RoPE / M-RoPE)")
    mrope = rope.get("mrope_section")
    if arch == "qwen3_vl_moe":
        mrope = tuple(mrope or (24, 20, 20))
        if rope.get("mrope_interleaved") is False:
            raise ConfigError("Qwen3-VL uses interleaved M-RoPE; mrope_interleaved=false is not supported")
    hidden = _req(c, "hidden_size")
    heads = _req(c, "num_attention_heads")
    head_dim = c.get("head_dim") or hidden // heads
    if mrope is not None and sum(mrope) * 2 != head_dim:
        raise ConfigError(f"mrope_section {list(mrope)} must sum to head_dim/2 = {head_dim // 2}")
    num_experts = c.get("num_experts", c.get("num_local_experts"))
    if num_experts is None:
        raise ConfigError("config.json gives neither num_experts nor num_local_experts")
    # Tied embeddings: VL checkpoints say it at the top level, text ones in the same dict.
    tie = top.get("tie_word_embeddings", c.get("tie_word_embeddings", False))
    return TextConfig(
        arch=arch,
        vocab_size=_req(c, "vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=_req(c, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=c.get("intermediate_size", 0),
        moe_intermediate_size=_req(c, "moe_intermediate_size"),
        num_experts=num_experts,
        num_experts_per_tok=_req(c, "num_experts_per_tok"),
        # transformers' Qwen3-VL-MoE router always renormalises; Qwen2/3-MoE read the flag.
        norm_topk_prob=bool(c.get("norm_topk_prob", arch == "qwen3_vl_moe")),
        decoder_sparse_step=c.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(c.get("mlp_only_layers") or ()),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        mrope_section=mrope,
        qkv_bias=c.get("qkv_bias", True) if arch == "qwen2_moe" else bool(c.get("attention_bias", False)),
        qk_norm=arch != "qwen2_moe",
        shared_expert_intermediate_size=c.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
        tie_word_embeddings=bool(tie),
        max_position_embeddings=c.get("max_position_embeddings", 32768),
    )


def _parse_vision(v: dict[str, Any]) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=_req(v, "depth"),
        hidden_size=_req(v, "hidden_size"),
        num_heads=_req(v, "num_heads"),
        intermediate_size=_req(v, "intermediate_size"),
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", 3),
        out_hidden_size=_req(v, "out_hidden_size"),
        num_position_embeddings=_req(v, "num_position_embeddings"),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", ())),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def _parse_quantization(top: dict[str, Any], text: dict[str, Any]) -> Fp8Config | None:
    # Qwen's files keep it at the top level; a VL config re-saved per sub-config may carry it in
    # text_config instead. Both at once must agree, or which one holds is a guess.
    ours, nested = top.get("quantization_config"), text.get("quantization_config")
    if ours is not None and nested is not None and ours != nested:
        raise ConfigError("config.json has two different quantization_config sections (top level and text_config)")
    try:
        return parse_quantization_config(ours if ours is not None else nested)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _parse_dtype(c: dict[str, Any], top: dict[str, Any]) -> torch.dtype:
    name = c.get("dtype") or c.get("torch_dtype") or top.get("dtype") or top.get("torch_dtype") or "bfloat16"
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (use one of {sorted(_DTYPES)})")
    return _DTYPES[name]


def _req(c: dict[str, Any], key: str) -> Any:
    if key not in c:
        raise ConfigError(f"config.json is missing {key!r}")
    return c[key]


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_eos_ids(model_dir: str | Path, config: ModelConfig) -> list[int]:
    """generation_config.json's eos ids (what transformers' generate stops on), else config.json's."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
        if value is not None:
            return value if isinstance(value, list) else [value]
    return list(config.eos_token_ids)
