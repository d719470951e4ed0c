"""The vision tower on its device: many images in, one varlen forward, one tensor per image out.

Only one thread calls `encode` (the service's vision loop), so the device sees one forward at a
time and never two competing for memory.

On CUDA each image's patches wait in pinned memory, already in the model dtype
(`host_pixel_values`, run on the preprocessing threads), and cross to the device straight into
their rows of the batch; the rows come back into a pinned buffer. Pageable copies go through the
driver's bounce buffer at a fraction of the link's rate, and fp32 patches are twice the bytes.
Casting on the host rounds exactly as the model's own cast on the device would (round to
nearest even), so the rows do not change.

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
        self._pinned = device.type == "cuda"
        self._staging_out = torch.empty(0, dtype=self.dtype)

    def host_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One image's [P, D] patches as `encode` wants them on the host: in the model dtype, pinned
        on CUDA (torch's pinned-memory cache reuses the pages once the copy to the device is done)."""
        if not self._pinned:
            return pixel_values.to(self.dtype)
        return torch.empty(pixel_values.shape, dtype=self.dtype, pin_memory=True).copy_(pixel_values)

    @torch.inference_mode()
    def encode(self, images: Sequence[tuple[torch.Tensor, Grid]]) -> list[torch.Tensor]:
        """[(pixel_values [P_i, D], grid_i)] -> [[N_i, H*(1+k)]] in the model dtype, on the CPU (or on
        the device with keep_on_device, for device-to-device transports).

        Each result gets its own storage (not a view of the batch), so a cached result costs
        exactly its own bytes and frees them when evicted.
        """
        grids = [grid for _, grid in images]
        rows = self.model(self._to_device([pv for pv, _ in images]), grids)  # [sum N_i, H*(1+k)]
        if not self.keep_on_device:
            rows = self._to_host(rows)
        return [part.clone() for part in rows.split(self.model.tokens_per_image(grids))]

    def _to_device(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """[P_i, D] host tensors -> one [sum P_i, D] device tensor in the model dtype."""
        if not self._pinned:
            return torch.cat(parts).to(self.device, self.dtype)
        batch = torch.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=self.dtype, device=self.device)
        start = 0
        for part in parts:  # pinned parts copy asynchronously; others (the start-up probe) block
            batch[start : start + part.shape[0]].copy_(part, non_blocking=part.is_pinned())
            start += part.shape[0]
        return batch

    def _to_host(self, rows: torch.Tensor) -> torch.Tensor:
        if not self._pinned:
            return rows.cpu()
        self._staging_out = _at_least(self._staging_out, rows.numel())
        host = self._staging_out[: rows.numel()].view(rows.shape)
        host.copy_(rows, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host  # a view of the staging buffer: `encode` clones each image out of it


def _at_least(buffer: torch.Tensor, numel: int) -> torch.Tensor:
    """`buffer` if it holds `numel` elements, else a new pinned one with room to grow."""
    if buffer.numel() >= numel:
        return buffer
    return torch.empty(max(numel, buffer.numel() * 3 // 2), dtype=buffer.dtype, pin_memory=True)
