"""Paged decode attention and TritonAttentionBackend against torch references.

Without CUDA the decode kernel runs under the Triton interpreter (fp32 and fp16, tiny shapes);
the `gpu` tests run the kernel and the whole backend (flash varlen prefill included) in bf16 at
the real shapes (Hq 32, Hkv 4, D 128, block 16). Cache blocks are scattered, context lengths are
not multiples of the block size, outputs are poisoned with NaN first.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Must precede triton's first import. When another module imported triton first (a full
    # pytest run), these tests skip here and test_kernels_dispatch.py reruns them in a fresh process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from models.attention import PagedKVCache, TorchAttentionBackend
from models.kernels import availability
from models.kernels.attention_backend import TritonAttentionBackend
from models.kernels.paged_attention import _torch_paged_decode, paged_decode_attention

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not availability.INTERPRET,
    reason="needs the Triton interpreter in this process (on CPU, test_kernels_dispatch.py runs it in a fresh one)",
)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output: a row was never written"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def decode_problem(context_lens, q_heads, kv_heads, head_dim, block_size, dtype, device="cpu", seed=0):
    """Random queries and cache; each sequence's blocks are a random, disjoint set of the pool."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // block_size) for c in context_lens)
    num_blocks = len(context_lens) * max_blocks + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[: len(context_lens) * max_blocks].view(len(context_lens), max_blocks)
    q = torch.randn(len(context_lens), q_heads, head_dim, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return cast(q), cast(cache[0]), cast(cache[1]), tables.to(device=device, dtype=torch.int32), lens


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (8, 1)])  # GQA ratios 1, 2, 8
# Whole contexts; fixed 64-key splits; and balanced splits (each context cut evenly over the
# 4 splits a 256-token plan gives, as CUDA graphs run it).
@pytest.mark.parametrize("split_len,max_context,balance", [(None, None, False), (64, None, False), (64, 256, True)])
def test_paged_decode_matches_reference(poisoned_empty, q_heads, kv_heads, dtype, tol, split_len, max_context, balance):
    context_lens = [1, 6, 17, 64, 150]  # 150 > 2 splits; the short ones leave splits empty
    q, k_cache, v_cache, tables, lens = decode_problem(context_lens, q_heads, kv_heads, 16, 4, dtype)
    ref = _torch_paged_decode(q.double(), k_cache.double(), v_cache.double(), tables, lens)
    out = paged_decode_attention(
        q, k_cache, v_cache, tables, lens, split_len=split_len, max_context=max_context, balance_splits=balance
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol


@interpreted
def test_decode_kernel_path_is_taken(monkeypatch):
    import models.kernels.paged_attention as paged

    def fail(*args):
        raise AssertionError("fell back to torch")

    monkeypatch.setattr(paged, "_torch_paged_decode", fail)
    q, k_cache, v_cache, tables, lens = decode_problem([5, 9], 4, 2, 16, 4, torch.float32)
    ref = _torch_paged_decode(q.double(), k_cache.double(), v_cache.double(), tables, lens)
    assert rel_err(paged.paged_decode_attention(q, k_cache, v_cache, tables, lens), ref) < 1e-5


def run_schedule(backend_cls, steps, q_heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Drive one backend through a schedule of flat batches; returns every step's output and the cache.

    steps: list of batches, each a list of (sequence, first position, new tokens).
    """
    gen = torch.Generator().manual_seed(seed)
    num_seqs = 1 + max(seq for step in steps for seq, _, _ in step)
    max_len = max(first + n for step in steps for _, first, n in step)
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = num_seqs * blocks_per_seq + 2
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)
    layers = 2
    cache = PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)
    backend = backend_cls(cache)
    outputs = []
    for step in steps:
        seqs = [seq for seq, _, _ in step]
        slots = [
            int(tables[s, p // block_size]) * block_size + p % block_size
            for s, first, n in step
            for p in range(first, first + n)
        ]
        batch = backend.prepare(
            [n for _, _, n in step],
            [first + n for _, first, n in step],
            torch.tensor(slots, device=device),
            tables[seqs].to(device),
        )
        tokens = batch.num_tokens
        identity = (
            torch.ones(tokens, head_dim, device=device, dtype=dtype),
            torch.zeros(tokens, head_dim, device=device, dtype=dtype),
        )  # rotary by angle 0
        for layer in range(layers):  # one batch for every layer, as the engine does
            q = torch.randn(tokens, q_heads, head_dim, generator=gen).to(device, dtype)
            k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(device, dtype)
            v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(device, dtype)
            outputs.append(backend.forward(layer, q, k, v, None, 1e-6, identity, batch))
    return outputs, cache.data


# Chunked prefill that ends mid-block, a mixed batch (one sequence decoding while another
# prefills a chunk), then decode-only batches with contexts that cross block boundaries.
SCHEDULE = [
    [(0, 0, 7)],
    [(0, 7, 6), (1, 0, 5)],
    [(0, 13, 1), (1, 5, 9)],
    [(0, 14, 1), (1, 14, 1), (2, 0, 3)],
    [(0, 15, 1), (1, 15, 1), (2, 3, 1)],
    [(2, 4, 1), (0, 16, 1), (1, 16, 1)],
]


@interpreted
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_backend_matches_torch_backend(poisoned_empty, q_heads, kv_heads):
    ref_out, ref_cache = run_schedule(TorchAttentionBackend, SCHEDULE, q_heads, kv_heads, 16, 4, torch.float32, "cpu")
    out, cache = run_schedule(TritonAttentionBackend, SCHEDULE, q_heads, kv_heads, 16, 4, torch.float32, "cpu")
    assert torch.equal(cache, ref_cache)
    for got, expected in zip(out, ref_out):
        assert rel_err(got, expected) < 1e-5


def test_backend_without_cache_is_plain_causal_prefill():
    torch.manual_seed(4)
    q, k, v = torch.randn(9, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    torch_backend, triton_backend = TorchAttentionBackend(), TritonAttentionBackend()
    expected = torch_backend.attend(0, q, k, v, torch_backend.prepare([4, 5], [4, 5]))
    torch.testing.assert_close(triton_backend.attend(0, q, k, v, triton_backend.prepare([4, 5], [4, 5])), expected)
    with pytest.raises(ValueError, match="needs a KV cache"):
        triton_backend.prepare([4, 5], [6, 5])


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens", [[1, 100, 4000], [7] * 64 + [2049]])
def test_paged_decode_bf16_real_shapes(context_lens):
    q, k_cache, v_cache, tables, lens = decode_problem(context_lens, 32, 4, 128, 16, torch.bfloat16, device="cuda")
    ref = _torch_paged_decode(q.float(), k_cache.float(), v_cache.float(), tables, lens)
    assert rel_err(paged_decode_attention(q, k_cache, v_cache, tables, lens), ref) < 1e-2
    # As CUDA graphs call it: int64 lengths and tables, balanced splits of an 8k plan.
    out = paged_decode_attention(
        q, k_cache, v_cache, tables.long(), lens.long(), max_context=8192, split_len=256, balance_splits=True
    )
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_backend_bf16_matches_fp32_torch_backend():
    steps = [[(0, 0, 700)], [(0, 700, 300), (1, 0, 1000)], [(0, 1000, 1), (1, 1000, 1)], [(1, 1001, 1), (0, 1001, 1)]]
    ref_out, _ = run_schedule(TorchAttentionBackend, steps, 32, 4, 128, 16, torch.float32, "cuda")
    out, _ = run_schedule(TritonAttentionBackend, steps, 32, 4, 128, 16, torch.bfloat16, "cuda")
    for got, expected in zip(out, ref_out):
        assert rel_err(got, expected) < 1e-2
