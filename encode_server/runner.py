"""The vision tower on its device: many images in, one varlen forward, one tensor per image out.

Only one thread calls `encode` (the service's vision loop), so the device sees one forward at a
time and never two competing for memory.

Legend: P patches, D = 3*2*16*16 values per patch, N merged tokens, H text hidden, k levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.qwen3_vision import Grid, Qwen3_VisionTransformer


class VisionRunner:
    def __init__(self, model: Qwen3_VisionTransformer, device: torch.device, keep_on_device: bool = False) -> None:
        self.model = model
        self.device = device
        self.keep_on_device = keep_on_device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def encode(self, images: Sequence[tuple[torch.Tensor, Grid]]) -> list[torch.Tensor]:
        """[(pixel_values [P_i, D], grid_i)] -> [[N_i, H*(1+k)]] in the model dtype, on the CPU (or on
        the device with keep_on_device, for device-to-device transports).

        Each result gets its own storage (not a view of the batch), so a cached result costs
        exactly its own bytes and frees them when evicted.
        """
        grids = [grid for _, grid in images]
        pixel_values = torch.cat([pv for pv, _ in images]).to(self.device)  # [sum P_i, D]
        rows = self.model(pixel_values, grids)  # [sum N_i, H*(1+k)]
        if not self.keep_on_device:
            rows = rows.cpu()  # waits for the device
        return [part.clone() for part in rows.split(self.model.tokens_per_image(grids))]
