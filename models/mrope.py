"""M-RoPE positions for Qwen3-VL prompts (reference: transformers' `get_rope_index`).

Text tokens get t = h = w = a running index. An image's N merged tokens get (t, h, w) of
their place in the merged grid, each offset by the position where the image starts; the text
after it starts at that offset + max(merged h, merged w), i.e. one past the largest position
used. During decode every axis is `index_in_sequence + delta`, with delta from the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grid = tuple[int, int, int]


def mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    image_grids: Sequence[Grid],
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """-> (positions [3, T] int64, delta) for one sequence whose image tokens are expanded.

    image_grids are in patches (before the merge), in prompt order.
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    m = spatial_merge_size
    chunks: list[torch.Tensor] = []
    pos = 0  # next free position
    i = 0
    grids = iter(image_grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            chunks.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        grid = next(grids, None)
        if grid is None:
            raise ValueError("the prompt has more image tokens than images")
        t, h, w = grid[0], grid[1] // m, grid[2] // m
        n = t * h * w
        if ids[i : i + n] != [image_token_id] * n:
            raise ValueError(f"an image with grid {tuple(grid)} needs {n} consecutive image tokens")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(h, w)
        i += n
    if next(grids, None) is not None:
        raise ValueError("more images than image placeholders in the prompt")
    positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    delta = (int(positions.max()) + 1 - len(ids)) if len(ids) else 0
    return positions.long(), delta


def generated_positions(start: int, end: int, delta: int) -> torch.Tensor:
    """[3, end - start] positions of the sequence's tokens start..end-1, all past its prompt:
    index + delta on every axis (empty when end <= start)."""
    return torch.arange(start, max(start, end)).expand(3, -1) + delta
