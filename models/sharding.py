"""Which slice of each full language-model tensor one tensor-parallel rank holds, and taking it.

The loader and the random weights (load_format dummy) both go through `shard_of` and `take`, so a
rank's shard of a checkpoint and of the dummy weights follow one rule (models/parallel.py gives
the layout). `take` slices anything indexable by a tuple of slices with a shape: a torch tensor,
or a safetensors slice (memory-mapped, so only the rank's bytes are read from the file).

A `Shard` is a list of ranges along one dimension, concatenated: two ranges for the fused
gate_up experts' split (the gate rows' share and the up rows' share), one for everything else.
Names are module parameter names (after the checkpoint prefix is mapped); expert tensors, which
come in three layouts, have their own rules in `expert_shard`.

Legend: Hq/Hkv query/KV heads, D head dim, E experts, I expert intermediate, H hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from models.config import TextConfig
from models.parallel import TensorParallel


class Sliceable(Protocol):
    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor: ...


@dataclass(frozen=True)
class Shard:
    dim: int
    ranges: tuple[tuple[int, int], ...]  # (start, stop) along `dim`, concatenated in order
    padded: int | None = None  # pad `dim` with zero rows to this length (the vocabulary)


def take(source: Sliceable, shape: tuple[int, ...], shard: Shard | None) -> torch.Tensor:
    """The rank's part of a tensor of `shape` read from `source` (the whole tensor if no shard)."""
    if shard is None:
        return source[tuple(slice(None) for _ in shape)]
    pieces = []
    for start, stop in shard.ranges:
        stop = min(stop, shape[shard.dim])  # the padded vocabulary's last rows are not in the file
        index = tuple(slice(start, stop) if d == shard.dim else slice(None) for d in range(len(shape)))
        if stop > start:
            pieces.append(source[index])
    out = torch.cat(pieces, dim=shard.dim) if len(pieces) > 1 else pieces[0] if pieces else None
    if shard.padded is None:
        return out
    if out is None:  # a rank whose whole share is padding
        out_shape = list(shape)
        out_shape[shard.dim] = 0
        out = torch.empty(out_shape)
    missing = shard.padded - out.shape[shard.dim]
    if missing:
        pad_shape = list(out.shape)
        pad_shape[shard.dim] = missing
        out = torch.cat([out, torch.zeros(pad_shape, dtype=out.dtype, device=out.device)], dim=shard.dim)
    return out


def _rows(start: int, count: int, scale: int = 1) -> tuple[tuple[int, int], ...]:
    return ((start * scale, (start + count) * scale),)


def shard_of(name: str, text: TextConfig, tp: TensorParallel) -> Shard | None:
    """The rank's slice of the non-expert parameter `name` (module naming); None: replicated."""
    if tp.size == 1:
        return None
    d = text.head_dim
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        first, rows = tp.split(tp.padded_vocab(text.vocab_size))
        return Shard(0, _rows(first, rows), padded=rows)
    if ".self_attn.q_proj." in name:
        return Shard(0, _rows(*tp.split(text.num_attention_heads), d))
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return Shard(0, _rows(*tp.kv_heads(text.num_key_value_heads), d))
    if name.endswith(".self_attn.o_proj.weight"):
        return Shard(1, _rows(*tp.split(text.num_attention_heads), d))
    # Dense MLPs and the shared expert: gate/up rows and down columns of the intermediate.
    inter = text.shared_expert_intermediate_size if ".shared_expert." in name else text.intermediate_size
    if name.endswith((".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".shared_expert.gate_proj.weight",
                      ".shared_expert.up_proj.weight")):  # fmt: skip
        return Shard(0, _rows(*tp.split(inter)))
    if name.endswith((".mlp.down_proj.weight", ".shared_expert.down_proj.weight")):
        return Shard(1, _rows(*tp.split(inter)))
    return None  # norms, the router, the shared-expert gate


def expert_shard(which: str, layout: str, text: TextConfig, tp: TensorParallel) -> Shard | None:
    """The rank's slice of a fused expert tensor: `which` gate_up_proj or down_proj, `layout`
    'hub' ([E, H, 2I] / [E, I, H]) or 'transformers' ([E, 2I, H] / [E, H, I])."""
    if tp.size == 1:
        return None
    if tp.expert_parallel:
        return Shard(0, _rows(*tp.experts(text.num_experts)))
    inter = text.moe_intermediate_size
    start, count = tp.expert_intermediate(inter)
    if which == "gate_up_proj":
        return Shard(2 if layout == "hub" else 1, ((start, start + count), (inter + start, inter + start + count)))
    return Shard(1 if layout == "hub" else 2, _rows(start, count))


def per_expert_shard(proj: str, text: TextConfig, tp: TensorParallel) -> Shard | None:
    """The rank's slice of one expert's `proj` (gate/up [I, H], down [H, I]) weight."""
    if tp.size == 1 or tp.expert_parallel:
        return None  # whole experts (expert-parallel ranks skip the others' altogether)
    return Shard(1 if proj == "down" else 0, _rows(*tp.expert_intermediate(text.moe_intermediate_size)))
