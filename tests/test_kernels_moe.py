"""Fused-MoE Triton kernels against a float64 torch reference.

Without CUDA the kernels run under the Triton interpreter (fp32 and fp16, tiny shapes); with CUDA
the `gpu` tests run them in bf16 at the real Qwen3-VL-30B-A3B shapes. Routing is drawn so that
some experts get no tokens and others get many, and outputs are poisoned with NaN first so an
unwritten row cannot pass.
"""

from __future__ import annotations

import os
import sys
import types

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Must precede triton's first import. When another module imported triton first (a full
    # pytest run), these tests skip here and test_kernels_dispatch.py reruns them in a fresh process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from models.fp8 import dequantize_experts, quantize_experts
from models.kernels import availability
from models.kernels.fused_moe import (
    MOE_CONFIGS,
    PREFILL_CONFIG,
    TRITON_MOE,
    MoeConfig,
    moe_config,
    triton_fused_experts,
)
from models.kernels.moe_align import (
    _align_one_program,
    _align_torch,
    align_pairs_to_experts,
    max_padded_rows,
)
from models.moe import TORCH_MOE, torch_fused_experts
from models.qwen2_moe import SparseMoeBlock

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not availability.INTERPRET,
    reason="needs the Triton interpreter in this process (on CPU, test_kernels_dispatch.py runs it in a fresh one)",
)


def make_problem(tokens, hidden, experts, inter, top_k, dtype, device="cpu", used_experts=None, seed=0):
    """Unit-scale activations, weights scaled so expert outputs stay unit-scale, and routing over
    `used_experts` only (the rest get zero tokens); each token picks top_k distinct experts."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(used_experts if used_experts is not None else range(experts))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]] for _ in range(tokens)])
    x = torch.randn(tokens, hidden, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(x), cast(gate_up), cast(down), cast(weights), ids.to(device)


def reference(x, gate_up, down, weights, ids):
    return torch_fused_experts(x.double(), gate_up.double(), down.double(), weights.double(), ids)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output: a row was never written"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("block_m", [16, 32])
def test_alignment_groups_pairs_by_expert(block_m):
    experts = 12
    ids = torch.stack([torch.tensor([1, 7, 9])[torch.randperm(3)] for _ in range(20)] + [torch.tensor([4, 7, 11])])
    align = align_pairs_to_experts(ids, experts, block_m)
    pairs = ids.numel()
    sorted_ids = align.sorted_pair_ids.long()
    assert sorted_ids.numel() == max_padded_rows(pairs, experts, block_m)
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair exactly once
    assert (sorted_ids[sorted_ids >= pairs] == pairs).all()  # padding holds the sentinel
    flat = ids.reshape(-1)
    for block, expert in enumerate(align.block_expert_ids.tolist()):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        rows = rows[rows < pairs]
        if expert == experts:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == expert).all()
    active = align.block_expert_ids[align.block_expert_ids < experts].tolist()
    assert active == sorted(active) and set(active) == {1, 4, 7, 9, 11}
    # Each expert's run is padded to whole blocks: 20 or 21 pairs -> ceil(n / block_m) blocks.
    counts = torch.bincount(flat, minlength=experts)
    for expert in set(active):
        assert active.count(expert) == -(-int(counts[expert]) // block_m)


@interpreted
@pytest.mark.parametrize(
    "tokens,experts,top_k,block_m", [(1, 128, 8, 16), (37, 12, 3, 16), (70, 8, 2, 32), (5, 6, 4, 64)]
)
@pytest.mark.parametrize("chunked", [False, True])
def test_triton_alignment_equals_torch(tokens, experts, top_k, block_m, chunked, monkeypatch):
    """Both Triton alignments (one program; chunks of pairs, here 16 so that even small cases
    span several chunks) must give exactly the torch version's layout."""
    import models.kernels.moe_align as moe_align

    monkeypatch.setattr(moe_align, "ALIGN_CHUNK", 16)
    gen = torch.Generator().manual_seed(tokens)
    used = torch.randperm(experts, generator=gen)[: max(top_k, experts // 2)]  # others get no pairs
    ids = torch.stack([used[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(tokens)])
    align = moe_align._align_chunked if chunked else _align_one_program
    got, want = align(ids, experts, block_m), _align_torch(ids, experts, block_m)
    assert torch.equal(got.sorted_pair_ids, want.sorted_pair_ids)
    assert torch.equal(got.block_expert_ids, want.block_expert_ids)


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize(
    "tokens,hidden,experts,inter,top_k,used",
    [
        (1, 32, 4, 16, 2, None),  # decode, one token: one block per pair, no alignment
        (2, 32, 4, 16, 3, [0, 1, 3]),  # two tokens sharing experts, still one block per pair
        (7, 48, 8, 40, 3, [0, 2, 3, 6]),  # odd sizes, 4 experts without tokens
        (37, 64, 16, 24, 4, [1, 5, 6, 9, 10, 15]),  # many tokens per expert: several blocks each
    ],
)
def test_fused_moe_matches_reference(poisoned_empty, tokens, hidden, experts, inter, top_k, used, dtype, tol):
    problem = make_problem(tokens, hidden, experts, inter, top_k, dtype, used_experts=used)
    ref = reference(*problem)
    for config in (moe_config(tokens), MoeConfig(16, 16, 16, 32, 4, 1)):  # K tail masked in the 2nd
        out = triton_fused_experts(*problem, config=config)
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel_err(out, ref) < tol, config


def expert_parallel_problem(tokens, hidden, experts, inter, top_k, dtype, ranks, rank, device="cpu", seed=0):
    """One rank's share of a problem under expert parallelism: its E/ranks experts' weights, ids
    renumbered locally with other ranks' experts as id E/ranks; and the float64 reference, the
    full problem with every other rank's terms weighted 0."""
    x, gate_up, down, weights, ids = make_problem(tokens, hidden, experts, inter, top_k, dtype, device, seed=seed)
    count = experts // ranks
    first = rank * count
    mine = (ids >= first) & (ids < first + count)
    local_ids = torch.where(mine, ids - first, count)
    ref = reference(x, gate_up, down, weights * mine, ids)
    local = (x, gate_up[first : first + count].contiguous(), down[first : first + count].contiguous(), weights)
    return (*local, local_ids), ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("tokens", [1, 3, 37])  # one block per pair (decode) and aligned blocks
@pytest.mark.parametrize("rank", [0, 2])
def test_fused_moe_skips_other_ranks_experts(poisoned_empty, tokens, rank, dtype, tol):
    """Expert parallelism: the kernels compute only this rank's experts; foreign pairs add nothing."""
    problem, ref = expert_parallel_problem(tokens, 32, 12, 16, 4, dtype, ranks=3, rank=rank, seed=tokens)
    assert (problem[-1] == 4).any() and (problem[-1] < 4).any()  # both kinds of pair are there
    for config in (moe_config(tokens), MoeConfig(16, 16, 16, 32, 4, 1)):
        out = triton_fused_experts(*problem, skip_foreign=True, config=config)
        assert rel_err(out, ref) < tol, config


def fp8_problem(tokens, hidden, experts, inter, top_k, dtype, device="cpu", seed=0):
    """A problem whose expert weights are block-wise FP8 (models/fp8.py), and the float64
    reference on the same weights dequantized: the kernel must equal the dequantized model."""
    x, gate_up, down, weights, ids = make_problem(tokens, hidden, experts, inter, top_k, torch.float32, seed=seed)
    (gate_up8, gate_up_s), (down8, down_s) = quantize_experts(gate_up, gate_up=True), quantize_experts(down)
    ref = reference(
        x.to(dtype),
        dequantize_experts(gate_up8, gate_up_s, torch.float64, gate_up=True),
        dequantize_experts(down8, down_s, torch.float64),
        weights.to(dtype),
        ids,
    )
    cast = lambda t: t.to(device)
    problem = (cast(x.to(dtype)), cast(gate_up8), cast(down8), cast(weights.to(dtype)), cast(ids))
    return problem, (cast(gate_up_s), cast(down_s)), ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize(
    "tokens,hidden,inter",
    [
        (1, 256, 128),  # decode, whole 128 blocks
        (5, 200, 48),  # partial blocks at the edges of both dimensions; I < 128: one block per half
        (37, 160, 320),  # aligned blocks, several experts per block row, I not a multiple of 128
    ],
)
def test_fused_moe_fp8_weights_equal_the_dequantized_model(poisoned_empty, tokens, hidden, inter, dtype, tol):
    problem, scales, ref = fp8_problem(tokens, hidden, 8, inter, 3, dtype, seed=tokens)
    assert problem[1].dtype == torch.float8_e4m3fn
    # The FP8 tile table's choice (None), the bf16 one, and K steps of 64 (two per scale block).
    for config in (None, moe_config(tokens), MoeConfig(16, 16, 16, 64, 4, 1)):
        out = triton_fused_experts(*problem, config=config, scales=scales)
        assert rel_err(out, ref) < tol, config


def test_fp8_experts_refuse_a_k_step_across_scale_blocks():
    problem, scales, _ = fp8_problem(3, 256, 4, 128, 2, torch.float32)
    if not availability.INTERPRET and not torch.cuda.is_available():
        pytest.skip("the torch fallback has no K steps")
    with pytest.raises(ValueError, match="BLOCK_K dividing"):
        triton_fused_experts(*problem, config=MoeConfig(16, 16, 16, 96, 4, 1), scales=scales)


@interpreted
def test_every_tuned_config_runs(poisoned_empty):
    problem = make_problem(21, 64, 8, 32, 4, torch.float32, seed=1)
    ref = reference(*problem)
    for config in [c for _, c in MOE_CONFIGS] + [PREFILL_CONFIG]:
        assert rel_err(triton_fused_experts(*problem, config=config), ref) < 1e-5, config


@interpreted
def test_kernel_path_is_taken(monkeypatch):
    """Under the interpreter the public function must run the kernels, not the fallback."""
    import models.kernels.fused_moe as fused_moe

    def fail(*args):
        raise AssertionError("fell back to torch")

    monkeypatch.setattr(fused_moe, "torch_fused_experts", fail)
    problem = make_problem(3, 32, 4, 16, 2, torch.float32, seed=2)
    assert rel_err(fused_moe.triton_fused_experts(*problem), reference(*problem)) < 1e-5


@interpreted
def test_moe_block_on_the_triton_backend():
    torch.manual_seed(3)
    block = SparseMoeBlock(hidden_size=32, num_experts=8, top_k=2, intermediate_size=16, norm_topk_prob=True)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(9, 32)

    def context(moe):  # the block reads only its MoE backend from the step's context
        return types.SimpleNamespace(kernels=types.SimpleNamespace(moe=moe))

    with torch.no_grad():
        expected = block(x, context(TORCH_MOE))
        got = block(x, context(TRITON_MOE))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300, 2100])
def test_fused_moe_bf16_real_shapes(tokens):
    problem = make_problem(tokens, 2048, 128, 768, 8, torch.bfloat16, device="cuda", seed=tokens)
    x, gate_up, down, weights, ids = problem
    ref = torch_fused_experts(x.float(), gate_up.float(), down.float(), weights.float(), ids).double()
    out = triton_fused_experts(*problem)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_fused_moe_expert_parallel_bf16_real_shapes(tokens):
    """Qwen3-VL-30B-A3B's 128 experts over 4 ranks, rank 1's 32: its terms only, in bf16."""
    problem, _ = expert_parallel_problem(tokens, 2048, 128, 768, 8, torch.bfloat16, 4, 1, device="cuda", seed=tokens)
    x, gate_up, down, weights, ids = problem
    mine = (ids < 32).float()
    ref = torch_fused_experts(x.float(), gate_up.float(), down.float(), weights.float() * mine, ids.clamp(max=31))
    out = triton_fused_experts(*problem, skip_foreign=True)
    assert rel_err(out, ref.double()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300, 2100])
def test_fused_moe_fp8_bf16_real_shapes(tokens):
    """FP8 experts at Qwen3-VL-30B-A3B's shapes, bf16 activations, every tile config in use."""
    problem, scales, ref = fp8_problem(tokens, 2048, 128, 768, 8, torch.bfloat16, device="cuda", seed=tokens)
    assert rel_err(triton_fused_experts(*problem, scales=scales).cpu(), ref) < 1e-2
