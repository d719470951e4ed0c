"""The Qwen3-VL vision tower.

Input: the patches of several images of different sizes, flattened and concatenated
(`[P, 3·2·16·16]` in the merge-friendly order the image processor emits) and each image's grid
(t, h, w) in patches. Output: one row per merged token, `[N, H·(1+k)]`: columns [0:H] are the
main merger's output (the image embedding), columns [H·(1+j) : H·(2+j)] are DeepStack level j
(deepstack merger j applied to the output of block deepstack_visual_indexes[j]).

Legend: P patches, Hv vision hidden, N = P / merge² merged tokens, H text hidden, k levels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import VisionConfig
from models.kernels.vision_ops import Segments, full_varlen_attention, segments, vision_rotary

Grid = tuple[int, int, int]
_GRID_TABLES_KEPT = 16  # at 1024x1024 a grid's tables are ~12 MB in bf16
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [P, D] fp32


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride: a linear map of each patch's 3·2·16·16 values."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.view(self.proj.out_channels, -1)
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: Rope, frames: Segments) -> torch.Tensor:
        p = x.shape[0]
        q, k, v = self.qkv(x).view(p, 3, self.num_heads, -1).unbind(1)  # each [P, heads, D]
        q, k = vision_rotary(q, k, *rope)
        out = full_varlen_attention(q, k, v, frames)
        return self.proj(out.reshape(p, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision hidden_act {config.hidden_act!r} is not supported")
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.linear_fc1
        if x.is_cuda and x.dim() == 2 and self.approximate == "tanh":
            # cuBLASLt's GELU epilogue is the tanh form: bias and GELU ride in the GEMM instead of
            # a pass over [P, intermediate] of their own (rounded once, not after fc1 and again).
            hidden = torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=True)
        else:
            hidden = F.gelu(fc1(x), approximate=self.approximate)
        return self.linear_fc2(hidden)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, rope: Rope, frames: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2×2 spatial merge + MLP to the text hidden size.

    The main merger normalises each patch (over Hv) before the shuffle; the deepstack mergers
    normalise the shuffled 4·Hv vector after it.
    """

    def __init__(self, config: VisionConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle_norm else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_dim, config.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.merged_dim))
        else:
            x = self.norm(x).view(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3_VisionTransformer(nn.Module):  # the seed design's name, kept
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if any(not 0 <= i < config.depth for i in config.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {config.deepstack_visual_indexes} outside depth {config.depth}")
        self.config = config
        self.merge = config.spatial_merge_size
        self.num_grid_per_side = int(config.num_position_embeddings**0.5)
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle_norm=True) for _ in config.deepstack_visual_indexes
        )
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def output_width(self) -> int:
        """H·(1+k): the width of one output row."""
        return self.config.out_hidden_size * (1 + self.config.num_deepstack_levels)

    def tokens_per_image(self, grid_thw: Sequence[Grid]) -> list[int]:
        return [t * h * w // self.merge**2 for t, h, w in grid_thw]

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[Grid]) -> torch.Tensor:
        """[P, patch_dim] patches of all images -> [N, H·(1+k)]."""
        grid_thw = [tuple(int(x) for x in g) for g in grid_thw]
        expected = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.shape != (expected, self.config.patch_dim):
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)} do not match grids {grid_thw}: "
                f"expected ({expected}, {self.config.patch_dim})"
            )
        x = self.patch_embed(pixel_values)
        tables = [self._grid_tables(grid, x.device) for grid in grid_thw]
        x = x + _cat([pos for pos, _, _ in tables]).to(x.dtype)
        rope = _cat([cos for _, cos, _ in tables]), _cat([sin for _, _, sin in tables])
        # Each frame of each image attends only to itself.
        cu_seqlens = [0]
        for t, h, w in grid_thw:
            for _ in range(t):
                cu_seqlens.append(cu_seqlens[-1] + h * w)
        frames = segments(cu_seqlens, x.device, x.dtype)

        # Levels are emitted in block order (as transformers does), which is config order for
        # every real checkpoint, whose deepstack_visual_indexes are ascending.
        levels: list[torch.Tensor] = []
        ds_index = {block: j for j, block in enumerate(self.config.deepstack_visual_indexes)}
        for i, block in enumerate(self.blocks):
            x = block(x, rope, frames)
            if i in ds_index:
                levels.append(self.deepstack_merger_list[ds_index[i]](x))
        return torch.cat([self.merger(x), *levels], dim=-1)

    def _grid_tables(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position embeddings [thw, Hv] and rotary cos, sin [thw, D] of one grid, kept for the
        last few grids seen (under inference mode, as the encoder runs): each is ~50 small ops to
        build, and images of one size recur."""
        if not torch.is_inference_mode_enabled():  # tensors made here may be saved for backward
            return self._position_embeddings(grid, device), *self._rotary(grid, device)
        weight = self.pos_embed.weight
        key = (grid, device, weight.data_ptr(), weight._version)
        if key not in self._tables:
            self._tables[key] = self._position_embeddings(grid, device), *self._rotary(grid, device)
            while len(self._tables) > _GRID_TABLES_KEPT:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key]

    def _patch_coords(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of each patch of an h×w frame, in merge-block order."""
        m = self.merge
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        shape = (h // m, m, w // m, m)
        return rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()

    def _position_embeddings(self, grid: Grid, device: torch.device) -> torch.Tensor:
        """The learned side×side table bilinearly resampled (align_corners) to the grid: [thw, Hv]."""
        t, h, w = grid
        side = self.num_grid_per_side
        rows, cols = self._patch_coords(h, w, device)
        r_taps, r_wts = _bilinear_taps(rows, h, side)
        c_taps, c_wts = _bilinear_taps(cols, w, side)
        idx = (r_taps[:, :, None] * side + c_taps[:, None, :]).flatten(1)  # [h*w, 4]
        wts = (r_wts[:, :, None] * c_wts[:, None, :]).flatten(1)
        emb = (self.pos_embed(idx) * wts[:, :, None].to(self.pos_embed.weight.dtype)).sum(1)
        return emb.repeat(t, 1)

    def _rotary(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D RoPE: the first half of each head's rotary dims follow the row, the second the column."""
        t, h, w = grid
        head_dim = self.config.hidden_size // self.config.num_heads
        spatial = head_dim // 2
        inv_freq = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial)
        )
        pos = torch.stack(self._patch_coords(h, w, device), -1).repeat(t, 1)  # [thw, 2]
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [thw, D/2]: rows' then columns'
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps and weights per index for resampling `side` positions to `size` (align_corners)."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
