"""DeepStack: visual features injected into the first k decoder layers' outputs.

Written once here and mixed into the two deepstack classes (the language side of
disaggregation and the text half of the monolithic VL model). Text-only classes never see it.

The step's ForwardContext carries `image_mask` [T] and `image_rows` [N, H·(1+k)] (the vision
tower's output, from the encode service or the monolithic model's own tower). `embed_inputs`
embeds the token ids and scatters the rows in: image embeddings at image positions, and the
deepstack tensor [T, k·H] (level j in columns [j·H, (j+1)·H), zero at text positions). After
decoder layer i (global index, i < k) level i is added to the layer's output, as transformers'
`_deepstack_process` does at image positions (adding zeros elsewhere leaves text rows
bit-identical). k comes from the rows' width, i.e. from the vision config.

Legend: T tokens, N image rows, H hidden, k DeepStack levels.
"""

from __future__ import annotations

import torch

from models.forward_context import ForwardContext
from models.multimodal import scatter_vision_rows


def add_deepstack(h: torch.Tensor, layer_idx: int, deepstack: torch.Tensor | None) -> torch.Tensor:
    """h [T, H] after decoder layer `layer_idx`; returns h plus that layer's level, if any."""
    if deepstack is None:
        return h
    hidden = h.shape[-1]
    if layer_idx >= deepstack.shape[-1] // hidden:
        return h
    level = deepstack[:, layer_idx * hidden : (layer_idx + 1) * hidden]
    return h + level.to(h.dtype)


class DeepStackMixin:
    """The deepstack steps of a decoder stack (models/qwen2_moe.py's hooks); mix in before the model."""

    def embed_inputs(self, input_ids: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.embed_tokens(input_ids)
        if ctx.image_rows is None:
            return h, None
        if ctx.image_mask is None or ctx.image_mask.shape[0] != h.shape[0]:
            raise ValueError(f"image rows need an image_mask of {h.shape[0]} positions")
        return scatter_vision_rows(h, ctx.image_mask, ctx.image_rows)

    def after_layer(
        self, layer_idx: int, h: torch.Tensor, residual: torch.Tensor | None, deepstack: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if deepstack is None or layer_idx >= deepstack.shape[-1] // h.shape[-1]:
            return h, residual
        # The level is added to the layer's output, h + residual rounded first (as the
        # reference), so the stream restarts from one tensor.
        summed = h if residual is None else h + residual
        return add_deepstack(summed, layer_idx, deepstack), None
