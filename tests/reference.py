"""transformers as the reference (fp32, CPU): loading it and running it on our inputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from models.backends import torch_kernels
from models.forward_context import prefill_context
from models.mrope import mrope_positions


def hf_model(ckpt_dir):
    """The transformers class for the checkpoint's config, loaded in fp32."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(ckpt_dir)
    cls = {
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    }[config.model_type]
    return cls.from_pretrained(ckpt_dir, dtype=torch.float32).eval()


def hf_vl_inputs(ids: Sequence[int], images, image_token_id: int) -> dict:
    """Keyword arguments for transformers' VL forward/generate from expanded ids and images."""
    input_ids = torch.tensor([list(ids)])
    kwargs = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == image_token_id).int()}
    if images:
        kwargs["pixel_values"] = torch.cat([im.pixel_values for im in images])
        kwargs["image_grid_thw"] = torch.tensor([im.grid for im in images])
    return kwargs


@torch.no_grad()
def our_prompt_logits(model, config, ids: Sequence[int], images=()) -> torch.Tensor:
    """All-position logits of one prompt through our model without a cache: [T, V]."""
    ids_t = torch.tensor(list(ids))
    if config.is_vl:
        positions, _ = mrope_positions(
            ids, [im.grid for im in images], config.image_token_id, config.vision.spatial_merge_size
        )
        kwargs = {}
        if images:
            kwargs = {
                "pixel_values": torch.cat([im.pixel_values for im in images]),
                "image_grid_thw": [im.grid for im in images],
            }
        hidden = model(ids_t, prefill_context(torch_kernels(), [len(ids)], positions=positions), **kwargs)
    else:
        hidden = model(ids_t, prefill_context(torch_kernels(), [len(ids)]))
    return model.compute_logits(hidden)


def block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The reference for an FP8 weight: block (i, j) of the fp8 values times scale_inv[i, j], block by
    block (edge blocks are simply shorter slices); written apart from models/fp8.py on purpose."""
    out = weight.to(torch.float32)
    rows, cols = scale_inv.shape
    for i in range(rows):
        for j in range(cols):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= float(scale_inv[i, j])
    return out


def write_dequantized_copy(fp8_dir: Path, out_dir: Path) -> Path:
    """A plain fp32 checkpoint holding an FP8 checkpoint's dequantized weights (no scales, no
    quantization_config): what transformers runs as the reference for the FP8 one. VL experts are
    fused into the Hub layout, the only one transformers 5 reads for Qwen3-VL-MoE."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_dir, out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        scale = tensors.pop(name)
        weight_name = name.removesuffix("_scale_inv")
        tensors[weight_name] = block_dequantize(tensors[weight_name], scale)
    config = json.loads((out_dir / "config.json").read_text())
    if config["model_type"] == "qwen3_vl_moe":
        _fuse_experts(tensors)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    del config["quantization_config"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _fuse_experts(tensors: dict[str, torch.Tensor]) -> None:
    """experts.{j}.{gate,up,down}_proj.weight -> Hub gate_up_proj [E, H, 2I] and down_proj [E, I, H]."""
    bases = sorted({n.split(".experts.")[0] for n in tensors if ".mlp.experts." in n})
    for base in bases:
        count = len([n for n in tensors if n.startswith(f"{base}.experts.") and n.endswith(".down_proj.weight")])
        gate_up, down = [], []
        for j in range(count):
            gate = tensors.pop(f"{base}.experts.{j}.gate_proj.weight")
            up = tensors.pop(f"{base}.experts.{j}.up_proj.weight")
            gate_up.append(torch.cat([gate, up]).T)  # gate first
            down.append(tensors.pop(f"{base}.experts.{j}.down_proj.weight").T)
        tensors[f"{base}.experts.gate_up_proj"] = torch.stack(gate_up).contiguous()
        tensors[f"{base}.experts.down_proj"] = torch.stack(down).contiguous()


def hf_chat_greedy(ckpt_dir, max_new_tokens: int):
    """generate(messages) -> (transformers' greedy tokens, prompt length) for a chat whose images
    are data URLs, preprocessed by transformers' own AutoImageProcessor (PIL), in fp32."""
    import base64
    import io

    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    model = hf_model(ckpt_dir)

    def generate(messages: list[dict]) -> tuple[list[int], int]:
        rendered, images = [], []
        for m in messages:
            if isinstance(m["content"], str):
                rendered.append(m)
                continue
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append(p)
                else:
                    images.append(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1]))))
                    parts.append({"type": "image"})
            rendered.append({"role": m["role"], "content": parts})
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        inputs = {}
        if images:
            processor = AutoImageProcessor.from_pretrained(ckpt_dir)
            out = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            pieces = text.split("<|image_pad|>")
            grids = out["image_grid_thw"]
            text = pieces[0] + "".join(
                "<|image_pad|>" * int(g.prod() // 4) + rest for g, rest in zip(grids, pieces[1:], strict=True)
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            inputs = {
                "pixel_values": out["pixel_values"],
                "image_grid_thw": grids,
                "mm_token_type_ids": (ids == model.config.image_token_id).int(),
            }
        with torch.no_grad():
            generated = model.generate(input_ids=ids, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return generated[0, ids.shape[1] :].tolist(), ids.shape[1]

    return generate
