"""Placing vision-tower output into a text batch; shared by the monolithic VL model and the
language side of disaggregation, so both build exactly the same inputs.

Vision output rows are [N, H·(1+k)]: the image embedding, then k DeepStack levels.
Legend: T tokens, H text hidden, k DeepStack levels.
"""

from __future__ import annotations

import torch


def split_vision_output(rows: torch.Tensor, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H·(1+k)] -> (image embeddings [N, H], deepstack [N, k·H]); views, no copies."""
    if rows.dim() != 2 or rows.shape[1] % hidden_size != 0 or rows.shape[1] < hidden_size:
        raise ValueError(f"vision output {tuple(rows.shape)} is not [N, {hidden_size}·(1+k)]")
    return rows[:, :hidden_size], rows[:, hidden_size:]


def scatter_vision_rows(
    inputs_embeds: torch.Tensor, image_mask: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put image rows at the masked token positions.

    inputs_embeds [T, H] (token embeddings), image_mask [T] bool, rows [mask.sum(), H·(1+k)]
    -> (inputs_embeds with image embeddings at image positions, input_deepstack_embeds [T, k·H]
    with zeros at text positions).
    """
    hidden = inputs_embeds.shape[1]
    embeds, deepstack = split_vision_output(rows, hidden)
    n = int(image_mask.sum())
    if n != rows.shape[0]:
        raise ValueError(f"{n} image tokens in the batch but {rows.shape[0]} vision rows")
    out = inputs_embeds.clone()
    out[image_mask] = embeds.to(out.dtype)
    ds = inputs_embeds.new_zeros(inputs_embeds.shape[0], deepstack.shape[1])
    ds[image_mask] = deepstack.to(ds.dtype)
    return out, ds
