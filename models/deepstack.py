"""DeepStack: visual features injected into the first k decoder layers' outputs.

Written once here and mixed into the two deepstack classes (the language side of
disaggregation and the text half of the monolithic VL model). Text-only classes never see it.

`input_deepstack_embeds` is [T, k·H]: level j in columns [j·H, (j+1)·H), zero at text
positions. After decoder layer i (global index, i < k) level i is added to the layer's output,
as transformers' `_deepstack_process` does at image positions (adding zeros elsewhere leaves
text rows bit-identical). k comes from the tensor's width, i.e. from the vision config.
"""

from __future__ import annotations

import torch

from models.attention import AttentionBackend, AttentionMetadata


def add_deepstack(h: torch.Tensor, layer_idx: int, input_deepstack_embeds: torch.Tensor | None) -> torch.Tensor:
    """h [T, H] after decoder layer `layer_idx`; returns h plus that layer's level, if any."""
    if input_deepstack_embeds is None:
        return h
    hidden = h.shape[-1]
    num_levels = input_deepstack_embeds.shape[-1] // hidden
    if layer_idx >= num_levels:
        return h
    level = input_deepstack_embeds[:, layer_idx * hidden : (layer_idx + 1) * hidden]
    return h + level.to(h.dtype)


class DeepStackMixin:
    """forward() of a decoder stack that takes `input_deepstack_embeds`; mix in before the model."""

    def forward(
        self,
        positions: torch.Tensor,
        attn: AttentionBackend,
        meta: AttentionMetadata,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.embed(input_ids, inputs_embeds)
        if input_deepstack_embeds is not None and input_deepstack_embeds.shape[0] != h.shape[0]:
            raise ValueError(
                f"input_deepstack_embeds has {input_deepstack_embeds.shape[0]} rows for {h.shape[0]} tokens"
            )
        rope = self.rotary(positions, h.dtype)
        levels = 0 if input_deepstack_embeds is None else input_deepstack_embeds.shape[-1] // h.shape[-1]
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, rope, attn, meta)
            if layer.layer_idx < levels:
                # The level is added to the layer's output, h + residual rounded first (as the
                # reference), so the stream restarts from one tensor.
                h, residual = add_deepstack(h + residual, layer.layer_idx, input_deepstack_embeds), None
        return self.norm(h) if residual is None else self.norm.add_forward(h, residual)[0]
