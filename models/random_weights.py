"""Random weights that behave like trained ones at the scale level, for the language model.

One recipe serves both places random weights come from: tiny checkpoints written offline
(models/tiny_checkpoint.py, tests) and `load_format: dummy` (the engine draws the real shapes on
its device, vLLM's --load-format dummy, so benchmarks need no 60 GB of files). HF's default init
gives near-uniform routing and logits, which hides MoE and deepstack bugs; this one keeps
activations unit-scale and routing and logits decisive:

- linear weights ~ N(0, 1/fan_in); projections that write into the residual stream (o_proj,
  down_proj) x gain = 1.5/sqrt(layers), expert and shared-expert down_proj x1.5 more (the gated
  activation and the routing weights shrink that branch);
- norm weights 1 ± 0.1, biases ~ N(0, 0.1²), embeddings ~ N(0, 1);
- router ~ N(0, 9/H): router logits have std ~3, so top-k picks are clear-cut;
- lm_head ~ N(0, 36/H): logits have std ~6, so greedy decoding is not a coin flip.

Names are matched by suffix, so checkpoint names (per-expert or fused layouts) and module
parameter names get the same scale. Legend: H hidden.
"""

from __future__ import annotations

import math

import torch

from models.config import TextConfig, load_config
from models.fp8_layers import fp8_module_names, quantize_modules
from models.loader import LoadedModel, full_shape, language_model_class
from models.parallel import SINGLE, TensorParallel, check_divisible
from models.sharding import expert_shard, shard_of, take


def residual_gain(num_layers: int) -> float:
    return 1.5 / math.sqrt(num_layers)


def text_weight_scale(name: str, shape: tuple[int, ...], hidden: int, gain: float) -> tuple[float, float]:
    """(mean, std) of the language-model parameter `name` of `shape` (fan-in is the last dim)."""
    fan_in_std = 1 / math.sqrt(shape[-1])
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    if name.endswith("lm_head.weight"):
        return 0.0, 6 / math.sqrt(hidden)
    if name.endswith("mlp.gate.weight"):
        return 0.0, 3 / math.sqrt(hidden)
    if name.endswith(".bias"):
        return 0.0, 0.1
    down = name.endswith(("down_proj", "down_proj.weight"))
    if down and (".experts." in name or ".shared_expert." in name):
        return 0.0, fan_in_std * 1.5 * gain
    if down or name.endswith("o_proj.weight"):
        return 0.0, fan_in_std * gain
    return 0.0, fan_in_std


@torch.no_grad()
def random_language_model(
    model_dir: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    tp: TensorParallel = SINGLE,
    keep_fp8: bool = False,
) -> LoadedModel:
    """The language model of `model_dir`'s config.json (no weight files needed) with random
    weights drawn on `device`. Every rank draws each full tensor in the same order and keeps its
    slice, so the ranks together hold exactly the one-rank model. `keep_fp8`, with an FP8 config:
    the modules Qwen's FP8 releases quantize are drawn, then quantized to FP8 with block scales
    (models/fp8_layers.py), as an FP8 checkpoint would load them."""
    config = load_config(model_dir)
    text = config.text
    check_divisible(text, tp.size, tp.expert_parallel)
    with torch.device("meta"):
        model = language_model_class(config)(text, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    if text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    gain = residual_gain(text.num_hidden_layers)
    for name, param in model.named_parameters():
        shape, shard = _full_tensor(name, tuple(param.shape), text, tp)
        mean, std = text_weight_scale(name, shape, text.hidden_size, gain)
        if shard is None:
            param.normal_(mean, std, generator=gen)
        else:
            full = torch.empty(shape, dtype=dtype, device=device).normal_(mean, std, generator=gen)
            param.copy_(take(full, shape, shard))
    if keep_fp8 and config.quantization is not None:
        quantize_modules(model, fp8_module_names(model))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bf16 originals: free for the KV cache sized next
    model.eval()
    return LoadedModel(model=model, config=config)


def _full_tensor(name: str, local: tuple[int, ...], text: TextConfig, tp: TensorParallel):
    """(the one-rank shape of parameter `name`, the rank's shard of it)."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        which = name.rsplit(".", 1)[1]
        inter = text.moe_intermediate_size
        shape = (text.num_experts, 2 * inter, text.hidden_size) if which == "gate_up_proj" else (
            text.num_experts, text.hidden_size, inter)  # fmt: skip
        return shape, expert_shard(which, "transformers", text, tp)
    return full_shape(name, local, text, tp), shard_of(name, text, tp)
