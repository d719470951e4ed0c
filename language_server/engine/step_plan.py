"""One engine step as data: what rank 0's scheduler decided, in the form every rank's model runs.

ModelRunner.plan builds it on the host from the scheduled chunks (the only code that reads
requests); ModelRunner.execute runs it on one rank's shard. With tensor parallelism rank 0 sends
each plan to the other ranks (ranks.py) before executing it itself, so they keep no request
state. `encode_plan` leaves the encoder rows out: they stay on rank 0's device and reach the
other ranks by a broadcast over the process group (GPU to GPU over NCCL), which is why the
encoded plan names only their shape.

Legend: T tokens in the step, B sequences, W block-table width, R encoder rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import msgpack
import numpy as np
import torch

from language_server.engine.cuda_graphs import DecodeStep


@dataclass
class EagerStep:
    """A prefill, mixed or long step: flat varlen inputs on the host (the encoder rows aside)."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] M-RoPE or [T]
    query_lens: list[int]  # [B] tokens each sequence computes
    context_lens: list[int]  # [B] keys each sequence attends to
    slots: torch.Tensor  # [T] cache slot of each token
    block_tables: torch.Tensor  # [B, W]
    image_mask: torch.Tensor | None = None  # [T] bool: positions that take an encoder row
    image_rows: torch.Tensor | None = None  # [R, H(1+k)] on the device


@dataclass
class StepPlan:
    step: EagerStep | DecodeStep  # DecodeStep: replayed from the decode graphs
    sample_rows: list[int] | None  # rows whose logits the step returns (eager: token indexes,
    # graph: batch rows); None: every row of a graph step; [] : none (a prompt chunk mid-way)


_TENSORS = ("token_ids", "positions", "slots", "block_tables", "image_mask")


def encode_plan(plan: StepPlan) -> bytes:
    """The plan as msgpack, the encoder rows as their shape only."""
    step = plan.step
    if isinstance(step, DecodeStep):
        body = {f.name: getattr(step, f.name) for f in fields(DecodeStep)}
        return msgpack.packb({"graph": True, "step": body, "rows": plan.sample_rows})
    body = {"query_lens": step.query_lens, "context_lens": step.context_lens}
    for name in _TENSORS:
        tensor = getattr(step, name)
        body[name] = None if tensor is None else _pack_tensor(tensor)
    body["image_rows"] = None if step.image_rows is None else list(step.image_rows.shape)
    return msgpack.packb({"graph": False, "step": body, "rows": plan.sample_rows})


def decode_plan(data: bytes) -> tuple[StepPlan, list[int] | None]:
    """(the plan, the shape of its encoder rows or None); the rows themselves are to be received."""
    raw = msgpack.unpackb(data)
    body = raw["step"]
    if raw["graph"]:
        return StepPlan(DecodeStep(**body), raw["rows"]), None
    tensors = {name: None if body[name] is None else _unpack_tensor(body[name]) for name in _TENSORS}
    step = EagerStep(query_lens=body["query_lens"], context_lens=body["context_lens"], **tensors)
    return StepPlan(step, raw["rows"]), body["image_rows"]


def _pack_tensor(tensor: torch.Tensor) -> list:
    array = tensor.numpy()
    return [array.dtype.str, list(array.shape), array.tobytes()]


def _unpack_tensor(packed: list) -> torch.Tensor:
    dtype, shape, data = packed
    return torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy())
