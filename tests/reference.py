"""transformers as the reference (fp32, CPU): loading it and running it on our inputs."""

from __future__ import annotations

from collections.abc import Sequence

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
