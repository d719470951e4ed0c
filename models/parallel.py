"""Tensor and expert parallelism: which part of the language model one rank holds, and the two
collectives its forward needs.

With `size` ranks (Megatron's layout, as vLLM and SGLang split these models):
- attention: each rank owns Hq/size query heads and their k/v heads: Hkv/size of them when
  size divides Hkv, else one KV head replicated on size/Hkv ranks (Qwen3-VL-30B-A3B's 4 KV heads
  at TP=8: each twice). q/k/v are column-parallel, o_proj row-parallel, then one all-reduce.
- MoE, `expert_parallel` off: every expert's intermediate dimension I is split (gate_up rows,
  down columns); on: whole experts, E/size per rank, every rank routing all tokens and adding
  only its experts' terms. Either way one all-reduce after the block (shared expert included).
- dense MLPs: the intermediate dimension is split, one all-reduce.
- embedding and lm_head: the vocabulary, padded to a multiple of size, split by rows; the
  embedding all-reduces its masked rows, the lm_head all-gathers the logits.
- norms, rotary, the router and the shared-expert gate: replicated.

`TensorParallel` is what the modules hold; at size 1 its collectives are no-ops, so the one
model serves one rank and many. `check_divisible` refuses, before anything loads, a shape that
does not split. Legend: Hq/Hkv query/KV heads, E experts, I intermediate, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.config import TextConfig


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False
    group: object | None = None  # the torch.distributed group of the ranks (None: the default group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size·n], rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's `value`, at start-up: over the default group (its timeout
        waits for the slowest rank's load), on the host (gloo, also beside NCCL)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ----- what this rank holds ---------------------------------------------------------------

    def split(self, total: int) -> tuple[int, int]:
        """(start, count) of this rank's equal share of `total` (a multiple of size)."""
        count = total // self.size
        return self.rank * count, count

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads) this rank holds: a share, or one replicated head."""
        if num_kv_heads % self.size == 0:
            return self.split(num_kv_heads)
        return self.rank // (self.size // num_kv_heads), 1

    def padded_vocab(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size) * self.size

    def experts(self, num_experts: int) -> tuple[int, int]:
        """(first expert, experts) this rank computes: all of them unless expert-parallel."""
        return self.split(num_experts) if self.expert_parallel else (0, num_experts)

    def expert_intermediate(self, inter: int) -> tuple[int, int]:
        """(start, columns) of each expert's intermediate dimension on this rank."""
        return (0, inter) if self.expert_parallel else self.split(inter)


SINGLE = TensorParallel()


def check_divisible(text: TextConfig, size: int, expert_parallel: bool) -> None:
    """Refuse a model that does not split over `size` ranks, naming the setting and the counts."""
    if size == 1:
        return
    setting = f"tensor_parallel_size={size}"
    problems = []
    if text.num_attention_heads % size:
        problems.append(f"num_attention_heads={text.num_attention_heads} is not a multiple of {size}")
    kv = text.num_key_value_heads
    if kv % size and size % kv:
        problems.append(
            f"num_key_value_heads={kv} neither divides by {size} nor divides it (KV heads are split "
            "or replicated whole)"
        )
    if any(text.is_moe_layer(i) for i in range(text.num_hidden_layers)):
        if expert_parallel and text.num_experts % size:
            problems.append(f"num_experts={text.num_experts} is not a multiple of {size} (expert_parallel=true)")
        if not expert_parallel and text.moe_intermediate_size % size:
            problems.append(
                f"moe_intermediate_size={text.moe_intermediate_size} is not a multiple of {size} "
                "(expert_parallel=false splits each expert; expert_parallel=true may fit)"
            )
        if text.shared_expert_intermediate_size % size:
            problems.append(
                f"shared_expert_intermediate_size={text.shared_expert_intermediate_size} is not a multiple of {size}"
            )
    if not all(text.is_moe_layer(i) for i in range(text.num_hidden_layers)) and text.intermediate_size % size:
        problems.append(f"intermediate_size={text.intermediate_size} (dense layers) is not a multiple of {size}")
    if problems:
        raise ValueError(f"the model does not split over {setting}: " + "; ".join(problems))
