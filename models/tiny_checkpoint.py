"""Random checkpoints in the Hugging Face Hub layout, written offline: tiny ones for tests and
full-width ones (the real Qwen3-VL-30B-A3B shapes, few layers) for memory and speed work.

The weights are random but not degenerate, so MoE and deepstack bugs change the outputs: the
language model's scales are models/random_weights.py's recipe (the one `load_format: dummy`
draws too); the vision tower's follow the same rules (linear N(0, 1/fan_in), residual writers x
1/sqrt(depth), norms 1 ± 0.1, biases N(0, 0.1²)) with the mergers' last linear x1.5 (after the
GELU), so activations stay unit-scale throughout.

Every tensor comes from its own generator, seeded by (seed, parameter name), so a file is a
pure function of its arguments (same seed, same bytes), the expert layout only moves numbers
around, and layer i of a 1-layer file equals layer i of a 48-layer one.

Legend for shape comments: E experts, H hidden, I expert intermediate, V vocab.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from models import fp8, tiny_tokenizer
from models.random_weights import residual_gain, text_weight_scale

ARCHS = ("qwen3_vl_moe", "qwen3_moe", "qwen2_moe")
SHAPES = ("tiny", "qwen3-vl-30b-a3b")
EXPERT_LAYOUTS = ("hub", "transformers", "per_expert")
CONFIG_SPELLINGS = ("hub", "transformers")
DEFAULT_SHARD_BYTES = 2_000_000_000

# Text dims per shapes name. The tiny moe_intermediate_size is 48, not 32: with H = 64 an I of
# 32 makes 2I == H, and then [E, H, 2I] and [E, 2I, H] have the same shape, so neither
# transformers nor our loader could tell the hub layout from the transformers one.
_TEXT = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        intermediate_size=128,
        shared_expert_intermediate_size=48,
        rope_theta=10000.0,
        mrope_section=[6, 5, 5],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
    "qwen3-vl-30b-a3b": dict(
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        rope_theta=5000000.0,
        mrope_section=[24, 20, 20],
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        vocab_size=151936,
    ),
}
_VISION = {
    "tiny": dict(
        depth=5,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1, 2, 3],
    ),
    "qwen3-vl-30b-a3b": dict(
        depth=27,
        hidden_size=1152,
        num_heads=16,
        intermediate_size=4304,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=2048,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    ),
}
# Image pixel limits (preprocessor size.shortest_edge / longest_edge): the real ones, and small
# ones for tiny so test images stay a handful of tokens.
_PIXELS = {"tiny": (1024, 65536), "qwen3-vl-30b-a3b": (65536, 16777216)}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", fp8.FP8_DTYPE: "F8_E4M3"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as stored in the file; `make` builds it when written, in `dtype` (None: the
    file's dtype; FP8 weights and their scales have their own)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    dtype: torch.dtype | None = None

    def nbytes(self, file_dtype: torch.dtype) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype or file_dtype).element_size()


# --------------------------------------------------------------------------- random init


class _Init:
    """Draws each logical parameter from a generator seeded by (seed, name)."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.seed = seed
        self.dtype = dtype

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}/{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).add_(mean)
        return tensor.to(self.dtype)

    def linear(self, name: str, shape: tuple[int, ...], gain: float = 1.0) -> torch.Tensor:
        return self.normal(name, shape, gain / math.sqrt(math.prod(shape[1:])))


# --------------------------------------------------------------------------- tensors


def _entries(arch: str, text: dict, vision: dict | None, layout: str, tie: bool, init: _Init) -> Iterator[TensorEntry]:
    """Every stored tensor of the checkpoint, in model order (so shards hold whole layers)."""
    H, V = text["hidden_size"], text["vocab_size"]

    def param(name: str, shape: tuple[int, ...], draw: Callable[[str, tuple[int, ...]], torch.Tensor]) -> TensorEntry:
        return TensorEntry(name, shape, lambda: draw(name, shape))

    def linear(gain: float = 1.0):
        return lambda name, shape: init.linear(name, shape, gain)

    def norm(name, shape):
        return init.normal(name, shape, 0.1, mean=1.0)

    def bias(name, shape):
        return init.normal(name, shape, 0.1)

    if vision is not None:
        yield from _vision_entries(vision, init, param, linear, norm, bias)

    prefix = "model.language_model." if arch == "qwen3_vl_moe" else "model."
    L, d = text["num_hidden_layers"], text["head_dim"]
    nq, nkv = text["num_attention_heads"], text["num_key_value_heads"]
    # Residual writers are scaled by the depth of the shapes preset, not of --layers, so a short
    # file's layers equal the long file's.
    gain = residual_gain(text["reference_layers"])

    def weight(name: str, shape: tuple[int, ...]) -> TensorEntry:
        mean, std = text_weight_scale(name, shape, H, gain)
        return param(name, shape, lambda n, s: init.normal(n, s, std, mean=mean))

    yield weight(f"{prefix}embed_tokens.weight", (V, H))
    for i in range(L):
        p = f"{prefix}layers.{i}."
        yield weight(p + "input_layernorm.weight", (H,))
        for proj, rows in (("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d)):
            yield weight(p + f"self_attn.{proj}.weight", (rows, H))
            if arch == "qwen2_moe":
                yield weight(p + f"self_attn.{proj}.bias", (rows,))
        yield weight(p + "self_attn.o_proj.weight", (H, nq * d))
        if arch != "qwen2_moe":
            yield weight(p + "self_attn.q_norm.weight", (d,))
            yield weight(p + "self_attn.k_norm.weight", (d,))
        yield weight(p + "post_attention_layernorm.weight", (H,))
        yield weight(p + "mlp.gate.weight", (text["num_experts"], H))
        yield from _expert_entries(p + "mlp.experts.", text, layout, init, gain)
        if arch == "qwen2_moe":
            Is = text["shared_expert_intermediate_size"]
            yield weight(p + "mlp.shared_expert.gate_proj.weight", (Is, H))
            yield weight(p + "mlp.shared_expert.up_proj.weight", (Is, H))
            yield weight(p + "mlp.shared_expert.down_proj.weight", (H, Is))
            yield weight(p + "mlp.shared_expert_gate.weight", (1, H))
    yield weight(f"{prefix}norm.weight", (H,))
    if not tie:
        yield weight("lm_head.weight", (V, H))


def _vision_entries(vision: dict, init: _Init, param, linear, norm, bias) -> Iterator[TensorEntry]:
    Hv, Iv, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
    tp, ps, m2 = vision["temporal_patch_size"], vision["patch_size"], vision["spatial_merge_size"] ** 2
    gain = 1.0 / math.sqrt(vision["reference_depth"])
    v = "model.visual."
    yield param(v + "patch_embed.proj.weight", (Hv, 3, tp, ps, ps), linear())
    yield param(v + "patch_embed.proj.bias", (Hv,), bias)
    yield param(v + "pos_embed.weight", (vision["num_position_embeddings"], Hv), lambda n, s: init.normal(n, s, 0.5))
    for b in range(vision["depth"]):
        p = f"{v}blocks.{b}."
        for n in ("norm1", "norm2"):
            yield param(p + f"{n}.weight", (Hv,), norm)
            yield param(p + f"{n}.bias", (Hv,), bias)
        for name, shape, g in (
            ("attn.qkv", (3 * Hv, Hv), 1.0),
            ("attn.proj", (Hv, Hv), gain),
            ("mlp.linear_fc1", (Iv, Hv), 1.0),
            ("mlp.linear_fc2", (Hv, Iv), gain),
        ):
            yield param(p + f"{name}.weight", shape, linear(g))
            yield param(p + f"{name}.bias", shape[:1], bias)
    mergers = ["merger"] + [f"deepstack_merger_list.{j}" for j in range(len(vision["deepstack_visual_indexes"]))]
    for merger in mergers:
        p = f"{v}{merger}."
        # The main merger normalises before the 2x2 shuffle (over Hv), deepstack ones after it.
        norm_width = Hv if merger == "merger" else Hv * m2
        yield param(p + "norm.weight", (norm_width,), norm)
        yield param(p + "norm.bias", (norm_width,), bias)
        yield param(p + "linear_fc1.weight", (Hv * m2, Hv * m2), linear())
        yield param(p + "linear_fc1.bias", (Hv * m2,), bias)
        yield param(p + "linear_fc2.weight", (out, Hv * m2), linear(1.5))  # x1.5 after the GELU: unit-scale output
        yield param(p + "linear_fc2.bias", (out,), bias)


def _expert_entries(prefix: str, text: dict, layout: str, init: _Init, gain: float) -> Iterator[TensorEntry]:
    """Experts in one of three layouts. The logical parameters are always the per-expert
    nn.Linear weights gate/up [I, H] and down [H, I]; fused layouts only rearrange them."""
    E, H, I = text["num_experts"], text["hidden_size"], text["moe_intermediate_size"]

    def scaled(name: str, shape: tuple[int, int]) -> torch.Tensor:
        mean, std = text_weight_scale(name, shape, H, gain)
        return init.normal(name, shape, std, mean=mean)

    def gate(j):
        return scaled(f"{prefix}{j}.gate_proj.weight", (I, H))

    def up(j):
        return scaled(f"{prefix}{j}.up_proj.weight", (I, H))

    def down(j):
        return scaled(f"{prefix}{j}.down_proj.weight", (H, I))

    if layout == "per_expert":
        for j in range(E):
            for name, shape, draw in (
                ("gate_proj", (I, H), gate),
                ("up_proj", (I, H), up),
                ("down_proj", (H, I), down),
            ):
                yield TensorEntry(f"{prefix}{j}.{name}.weight", shape, lambda draw=draw, j=j: draw(j))
        return
    hub = layout == "hub"

    def gate_up() -> torch.Tensor:  # hub [E, H, 2I], transformers [E, 2I, H]; gate first
        fused = torch.empty((E, H, 2 * I) if hub else (E, 2 * I, H), dtype=init.dtype)
        for j in range(E):
            both = torch.cat([gate(j), up(j)], dim=0)  # [2I, H]
            fused[j] = both.T if hub else both
        return fused

    def down_fused() -> torch.Tensor:  # hub [E, I, H], transformers [E, H, I]
        fused = torch.empty((E, I, H) if hub else (E, H, I), dtype=init.dtype)
        for j in range(E):
            fused[j] = down(j).T if hub else down(j)
        return fused

    yield TensorEntry(prefix + "gate_up_proj", (E, H, 2 * I) if hub else (E, 2 * I, H), gate_up)
    yield TensorEntry(prefix + "down_proj", (E, I, H) if hub else (E, H, I), down_fused)


# What Qwen's FP8 releases quantize: the language model's attention projections and the expert
# (and shared-expert) projections; embeddings, lm_head, norms, routers and the vision tower stay.
_FP8_LINEAR = re.compile(
    r"^model\.(?:language_model\.)?layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(?:gate|up|down)_proj"
    r"|mlp\.shared_expert\.(?:gate|up|down)_proj)\.weight$"
)


def _fp8_entries(entries: list[TensorEntry]) -> tuple[list[TensorEntry], list[str]]:
    """Each FP8 linear weight becomes an float8 weight plus its `weight_scale_inv` grid (block
    scale amax / 448, as fp8.quantize draws it); returns the entries and the unquantized modules
    (the config's modules_to_not_convert)."""
    out, kept = [], set()
    for entry in entries:
        if not _FP8_LINEAR.match(entry.name):
            out.append(entry)
            kept.add(entry.name.rsplit(".", 1)[0])
            continue
        weight, scale = _quantized(entry)
        out.append(TensorEntry(entry.name, entry.shape, weight, fp8.FP8_DTYPE))
        out.append(TensorEntry(entry.name + fp8.SCALE_SUFFIX, fp8.scale_grid(entry.shape), scale, torch.float32))
    return out, sorted(kept)


def _quantized(entry: TensorEntry) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Makers of an entry's fp8 weight and its scale grid from one draw and one quantization: the
    scale (written right after its weight) is handed over, not computed again."""
    held: dict[str, torch.Tensor] = {}

    def weight() -> torch.Tensor:
        quantized, held["scale"] = fp8.quantize(entry.make())
        return quantized

    def scale() -> torch.Tensor:
        return held.pop("scale") if "scale" in held else fp8.quantize(entry.make())[1]

    return weight, scale


def _fp8_quantization_config(modules_to_not_convert: list[str]) -> dict:
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "modules_to_not_convert": modules_to_not_convert,
        "quant_method": "fp8",
        "weight_block_size": list(fp8.BLOCK),
    }


# --------------------------------------------------------------------------- config


def _text_config(arch: str, text: dict, ids: dict[str, int], dtype_name: str, tie: bool, spelling: str) -> dict:
    config = {
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "decoder_sparse_step": 1,
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "mlp_only_layers": [],
        "moe_intermediate_size": text["moe_intermediate_size"],
        "norm_topk_prob": arch != "qwen2_moe",
        "num_attention_heads": text["num_attention_heads"],
        "num_experts": text["num_experts"],
        "num_experts_per_tok": text["num_experts_per_tok"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "output_router_logits": False,
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_theta": text["rope_theta"],
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": text["vocab_size"],
    }
    rope = {"rope_type": "default"}
    if arch == "qwen3_vl_moe":
        config["model_type"] = "qwen3_vl_moe_text"
        rope.update(mrope_section=text["mrope_section"], mrope_interleaved=True)
        config["rope_scaling"] = rope
        del config["tie_word_embeddings"]  # the real VL config keeps it at the top level only
    else:
        config["model_type"] = arch
        config["architectures"] = ["Qwen3MoeForCausalLM" if arch == "qwen3_moe" else "Qwen2MoeForCausalLM"]
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=text["num_hidden_layers"])
        config["rope_scaling"] = None
    if arch == "qwen2_moe":
        config["shared_expert_intermediate_size"] = text["shared_expert_intermediate_size"]
    else:
        config["attention_bias"] = False
    config["head_dim"] = text["head_dim"]
    if spelling == "transformers":
        # What transformers 5 save_pretrained writes: rope_parameters, dtype, and for the Qwen3
        # families num_local_experts (Qwen2MoeConfig has no such alias and keeps num_experts).
        scaling = config.pop("rope_scaling") or {"rope_type": "default"}
        config["rope_parameters"] = {**scaling, "rope_theta": config.pop("rope_theta")}
        config["dtype"] = config.pop("torch_dtype")
        if arch != "qwen2_moe":
            config["num_local_experts"] = config.pop("num_experts")
        if arch == "qwen3_vl_moe":
            config["tie_word_embeddings"] = tie
        if arch == "qwen2_moe":
            config["qkv_bias"] = True
    return config


def _vl_config(text_config: dict, vision: dict, ids: dict[str, int], dtype_name: str, tie: bool, spelling: str) -> dict:
    vision_config = {
        "deepstack_visual_indexes": list(vision["deepstack_visual_indexes"]),
        "depth": vision["depth"],
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vision["hidden_size"],
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": vision["intermediate_size"],
        # The Hub file says "qwen3_vl_moe" here; transformers rewrites it to "..._vision".
        "model_type": "qwen3_vl_moe" if spelling == "hub" else "qwen3_vl_moe_vision",
        "num_heads": vision["num_heads"],
        "num_position_embeddings": vision["num_position_embeddings"],
        "out_hidden_size": vision["out_hidden_size"],
        "patch_size": vision["patch_size"],
        "spatial_merge_size": vision["spatial_merge_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
    }
    config = {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl_moe",
        "text_config": text_config,
        "tie_word_embeddings": tie,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision_config,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }
    config["dtype" if spelling == "transformers" else "torch_dtype"] = dtype_name
    if spelling == "transformers":
        vision_config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "axial"}
    return config


# --------------------------------------------------------------------------- safetensors


def _write_safetensors(path: Path, entries: list[TensorEntry], dtype: torch.dtype, progress) -> None:
    """Write one safetensors file tensor by tensor: the header is known up front from the
    shapes, so only one tensor is ever in memory."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        nbytes = entry.nbytes(dtype)
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.dtype or dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for entry in entries:
            tensor = entry.make()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != (entry.dtype or dtype):
                raise AssertionError(f"{entry.name}: made {tuple(tensor.shape)} {tensor.dtype}, planned {entry.shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            progress.update(entry.nbytes(dtype))


def _shard(entries: list[TensorEntry], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorEntry]]:
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry.nbytes(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


# --------------------------------------------------------------------------- entry point


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


def write_tiny_checkpoint(
    directory,
    *,
    seed: int = 0,
    arch: str = "qwen3_vl_moe",
    shapes: str = "tiny",
    num_layers: int | None = None,
    deepstack_visual_indexes: list[int] | None = None,
    expert_layout: str | None = None,
    tie_word_embeddings: bool = False,
    config_spelling: str = "hub",
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int | None = None,
    metadata_only: bool = False,
    progress: bool | None = None,
    quantize_fp8: bool = False,
    text_overrides: dict | None = None,
) -> Path:
    """Write a random checkpoint (weights, config, tokenizer, processor files) into `directory`.

    arch: "qwen3_vl_moe", "qwen3_moe" or "qwen2_moe" (text-only; shared expert, qkv bias).
    shapes: "tiny" (fp32, one model.safetensors) or "qwen3-vl-30b-a3b" (bf16, ~2 GB shards).
    expert_layout: "hub" (fused [E, H, 2I] / [E, I, H], the VL default), "transformers" (fused
    [E, 2I, H] / [E, H, I], what save_pretrained writes) or "per_expert" (text-only default).
    config_spelling: "hub" (num_experts, rope_theta + rope_scaling, torch_dtype) or
    "transformers" (rope_parameters, dtype, num_local_experts where transformers writes it).
    max_shard_bytes: write model-0000k-of-0000n.safetensors + model.safetensors.index.json.
    metadata_only: write config, tokenizer and index files but no weights (for tests and
    dry runs of the large shapes).
    quantize_fp8: Qwen's block-wise FP8 layout (models/fp8.py): language linear weights in
    float8 e4m3 with 128x128 `weight_scale_inv` grids, experts one by one, quantization_config
    in config.json; everything else in `dtype`.
    text_overrides: text-config fields that replace the shapes' own (head or expert counts that
    divide by a tensor-parallel size, say).
    """
    arch = _check(arch.replace("-", "_"), ARCHS, "arch")
    shapes = _check(shapes, SHAPES, "shapes")
    default_layout = "hub" if arch == "qwen3_vl_moe" and not quantize_fp8 else "per_expert"
    expert_layout = _check(expert_layout or default_layout, EXPERT_LAYOUTS, "expert layout")
    if quantize_fp8 and expert_layout != "per_expert":
        raise ValueError(
            "FP8 checkpoints store experts one by one; use expert layout per_expert (the default with fp8)"
        )
    config_spelling = _check(config_spelling, CONFIG_SPELLINGS, "config spelling")
    if shapes != "tiny" and arch == "qwen2_moe":
        raise ValueError("--shapes qwen3-vl-30b-a3b has no qwen2-moe variant; use qwen3-vl-moe or qwen3-moe")
    if isinstance(dtype, str):
        dtype = {name: dt for dt, name in _DTYPE_NAMES.items()}.get(dtype)
        if dtype is None:
            raise ValueError(f"unknown dtype; choose one of {', '.join(_DTYPE_NAMES.values())}")
    dtype = dtype or (torch.float32 if shapes == "tiny" else torch.bfloat16)
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} is not supported; choose one of {', '.join(_DTYPE_NAMES.values())}")

    ids = tiny_tokenizer.token_ids()
    text = dict(_TEXT[shapes])
    text.update(text_overrides or {})
    text["reference_layers"] = text["num_hidden_layers"]
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        text["num_hidden_layers"] = num_layers
    text.setdefault("vocab_size", -(-tiny_tokenizer.tokenizer_size() // 64) * 64)
    if text["vocab_size"] < tiny_tokenizer.tokenizer_size():
        raise AssertionError("the vocabulary must cover the tokenizer")

    vision = None
    if arch == "qwen3_vl_moe":
        vision = dict(_VISION[shapes], reference_depth=_VISION[shapes]["depth"])
        if deepstack_visual_indexes is not None:
            vision["deepstack_visual_indexes"] = list(deepstack_visual_indexes)
        bad = [i for i in vision["deepstack_visual_indexes"] if not 0 <= i < vision["depth"]]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} outside the vision blocks 0..{vision['depth'] - 1}")
    elif deepstack_visual_indexes is not None:
        raise ValueError("deepstack_visual_indexes is a vision setting; text-only archs have no vision tower")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype_name = _DTYPE_NAMES[dtype]
    config = _text_config(arch, text, ids, dtype_name, tie_word_embeddings, config_spelling)
    if vision is not None:
        config = _vl_config(config, vision, ids, dtype_name, tie_word_embeddings, config_spelling)
    entries = list(_entries(arch, text, vision, expert_layout, tie_word_embeddings, _Init(seed, dtype)))
    if quantize_fp8:
        entries, unquantized = _fp8_entries(entries)
        config["quantization_config"] = _fp8_quantization_config(unquantized)  # top level, VL included
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tiny_tokenizer.write_tokenizer_files(directory, model_max_length=text["max_position_embeddings"])
    tiny_tokenizer.write_generation_config(directory, sampling_defaults=shapes != "tiny")
    if vision is not None:
        min_pixels, max_pixels = _PIXELS[shapes]
        tiny_tokenizer.write_preprocessor_config(
            directory,
            patch_size=vision["patch_size"],
            temporal_patch_size=vision["temporal_patch_size"],
            merge_size=vision["spatial_merge_size"],
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )

    if max_shard_bytes is None and shapes != "tiny":
        max_shard_bytes = DEFAULT_SHARD_BYTES
    if max_shard_bytes is None:
        shards = {"model.safetensors": entries}
    else:
        groups = _shard(entries, dtype, max_shard_bytes)
        shards = {f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors": g for k, g in enumerate(groups)}
        total = sum(math.prod(e.shape) for e in entries)
        index = {
            "metadata": {"total_parameters": total, "total_size": sum(e.nbytes(dtype) for e in entries)},
            "weight_map": {e.name: file for file, group in shards.items() for e in group},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if metadata_only:
        return directory

    from tqdm import tqdm

    total_bytes = sum(e.nbytes(dtype) for e in entries)
    show = progress if progress is not None else shapes != "tiny"
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing weights", disable=not show) as bar:
        for file, group in shards.items():
            _write_safetensors(directory / file, group, dtype, bar)
    return directory
