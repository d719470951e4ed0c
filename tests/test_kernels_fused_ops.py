"""The fused small ops (models/kernels/fused_ops.py) against their torch references (models/ops.py).

Without CUDA the kernels run under the Triton interpreter in fp32 and fp16; with CUDA the `gpu`
tests run them in bf16 at the real shapes. Outputs are poisoned with NaN first, so an unwritten
element cannot pass; a whole model switched to the fused ops must give the reference's tokens.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Must precede triton's first import; see tests/test_kernels_moe.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from models import ops
from models.kernels import availability, fused_ops, vision_ops

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not availability.INTERPRET,
    reason="needs the Triton interpreter in this process (on CPU, test_kernels_dispatch.py runs it in a fresh one)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16/bf16 differences come from one rounding flip of a bf16 intermediate at most.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rand(*shape, dtype, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=DEVICE, dtype=dtype)


def close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def check_norms(dtype, rows, hidden):
    x, res = rand(rows, hidden, dtype=dtype, seed=1, scale=3), rand(rows, hidden, dtype=dtype, seed=2)
    w = rand(hidden, dtype=dtype, seed=3, scale=0.1, shift=1.0)
    close(fused_ops.rms_norm(x, w, 1e-6), ops.torch_rms_norm(x, w, 1e-6), dtype)
    out, summed = fused_ops.add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_summed = ops.torch_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(summed, ref_summed)  # one rounded add: bit-exact
    close(out, ref_out, dtype)


def check_qk_norm_rope(dtype, tokens, hq, hk, d, with_norm, with_cache=False):
    from models.attention import PagedKVCache

    # q, k and v as views into one fused qkv output, as the attention layer produces them.
    qkv = rand(tokens, (hq + 2 * hk) * d, dtype=dtype, seed=4, scale=2)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(tokens, hq, d), k.view(tokens, hk, d), v.view(tokens, hk, d)
    qw = rand(d, dtype=dtype, seed=5, scale=0.1, shift=1.0) if with_norm else None
    kw = rand(d, dtype=dtype, seed=6, scale=0.1, shift=1.0) if with_norm else None
    angles = torch.rand(tokens, d // 2, generator=torch.Generator().manual_seed(7)) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    caches, writes = [], []
    for _ in range(2 if with_cache else 0):  # one for the kernel, one for the reference
        cache = PagedKVCache(2, 3, 4, hk, d, dtype, DEVICE)
        cache.data.fill_(float("nan"))  # slots the step does not own must stay untouched
        slots = torch.randperm(12, generator=torch.Generator().manual_seed(8))[:tokens].to(DEVICE)
        caches.append(cache)
        writes.append(cache.target(1, slots))
    out_q, out_k = fused_ops.qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin, v, writes[0] if with_cache else None)
    ref_q, ref_k = ops.torch_qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin, v, writes[1] if with_cache else None)
    close(out_q, ref_q, dtype)
    close(out_k, ref_k, dtype)
    if with_cache:
        written = ~torch.isnan(caches[1].data)
        assert torch.equal(written, ~torch.isnan(caches[0].data)), "wrong slots written"
        assert torch.equal(caches[0].data[1, 1][written[1, 1]], caches[1].data[1, 1][written[1, 1]]), "v differs"
        close(caches[0].data[1, 0][written[1, 0]], caches[1].data[1, 0][written[1, 0]], dtype)


def check_route(dtype, tokens, experts, top_k, normalize):
    logits = rand(tokens, experts, dtype=dtype, seed=8, scale=3)
    weights, ids = fused_ops.route(logits, top_k, normalize)
    ref_w, ref_ids = ops.torch_route(logits, top_k, normalize)
    assert ids.dtype == torch.int64 and ids.shape == ref_ids.shape
    assert all(len(set(row)) == top_k for row in ids.tolist()), "an expert picked twice"
    # bf16 logits tie often; among equals torch.topk's pick is unspecified, so compare what was
    # picked by value: the same probabilities, in the same (descending) order.
    probs = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(probs.gather(1, ids), probs.gather(1, ref_ids))
    close(weights, ref_w, dtype)


def check_vision_rotary(dtype, patches, heads, d):
    # q and k as views into the vision qkv output [P, 3, heads, D]; cos and sin in fp32.
    qkv = rand(patches, 3, heads, d, dtype=dtype, seed=9, scale=2)
    q, k, _ = qkv.unbind(1)
    angles = torch.rand(patches, d // 2, generator=torch.Generator().manual_seed(10)) * 30
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    out_q, out_k = vision_ops.vision_rotary(q, k, cos, sin)
    ref_q, ref_k = vision_ops.torch_vision_rotary(q, k, cos, sin)
    assert out_q.is_contiguous() and out_k.is_contiguous()
    close(out_q, ref_q, dtype)
    close(out_k, ref_k, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vision_rotary_interpreted(poisoned_empty, dtype):
    check_vision_rotary(dtype, patches=5, heads=3, d=12)  # halves of 6 and 3 heads: masked lanes


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norms_interpreted(poisoned_empty, dtype):
    check_norms(dtype, rows=5, hidden=48)  # H not a power of two: masked columns


@interpreted
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("with_cache", [True, False])
def test_qk_norm_rope_interpreted(poisoned_empty, with_norm, with_cache):
    check_qk_norm_rope(torch.float32, tokens=3, hq=4, hk=2, d=16, with_norm=with_norm, with_cache=with_cache)
    check_qk_norm_rope(torch.float16, tokens=2, hq=2, hk=1, d=8, with_norm=with_norm, with_cache=with_cache)


@interpreted
@pytest.mark.parametrize("normalize", [True, False])
def test_route_interpreted(poisoned_empty, normalize):
    check_route(torch.float32, tokens=6, experts=12, top_k=3, normalize=normalize)  # E, K not powers of two


@interpreted
@pytest.mark.parametrize("ckpt", ["qwen3_text_ckpt", "qwen2_text_ckpt"])
def test_tiny_model_gives_the_reference_logits_with_fused_ops(request, ckpt):
    """A whole tiny model (Qwen3: q/k norm; Qwen2: qkv bias, no q/k norm), once on the
    references and once on the fused ops with fused qkv: the same logits up to fp32 rounding."""
    from models.backends import torch_kernels
    from models.forward_context import Kernels, prefill_context
    from models.kernels import TritonAttentionBackend
    from models.loader import load_model
    from models.moe import MoeBackend, torch_fused_experts

    model = load_model(request.getfixturevalue(ckpt), part="full", device="cpu", dtype=torch.float32).model
    ids = torch.randint(0, model.config.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    # Fused norms, rotary, attention and routing; the torch experts (test_kernels_moe.py has the Triton ones).
    fused = Kernels(
        TritonAttentionBackend(),
        fused_ops.FUSED_OPS,
        MoeBackend("fused-route", fused_ops.route, torch_fused_experts, graph_capturable=False),
    )
    with torch.no_grad():
        ref = model.compute_logits(model(ids, prefill_context(torch_kernels(), [4, 3])))
        model.fuse_qkv()
        out = model.compute_logits(model(ids, prefill_context(fused, [4, 3])))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@interpreted
def test_engine_path_with_fused_kv_write_matches_reference(vl_ckpt):
    """Prefill then decode through the Triton backend's paged cache, with every fused op and the
    KV write inside the rotary kernel, against the torch reference backend: the same logits."""
    from models.attention import PagedKVCache
    from models.backends import select_kernels
    from models.forward_context import forward_context
    from models.loader import load_model

    model = load_model(vl_ckpt, part="language", device="cpu", dtype=torch.float32).model
    vocab = model.config.vocab_size
    ids = torch.randint(0, 400, (6,), generator=torch.Generator().manual_seed(1)) % vocab
    steps = [  # (token ids, positions, query lens, context lens, slots): a 5-token prompt in blocks [2, 0], one decode
        (ids[:5], torch.arange(5), [5], [5], torch.tensor([8, 9, 10, 11, 0])),
        (ids[5:], torch.tensor([5]), [1], [6], torch.tensor([1])),
    ]
    tables = torch.tensor([[2, 0]])
    results = []
    for name in ("torch", "triton"):
        cache = PagedKVCache(
            model.config.num_hidden_layers,
            4,
            4,
            model.config.num_key_value_heads,
            model.config.head_dim,
            torch.float32,
            "cpu",
        )
        kernels = select_kernels(name, "torch", cache, torch.device("cpu"))
        with torch.no_grad():
            results.append(
                [
                    model.compute_logits(model(tok, forward_context(kernels, pos, q, c, slots, tables)))
                    for tok, pos, q, c, slots in steps
                ]
            )
    for ref, out in zip(*results):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_gpu_real_shapes(dtype):
    check_norms(dtype, rows=33, hidden=2048)
    check_qk_norm_rope(dtype, tokens=10, hq=32, hk=4, d=128, with_norm=True, with_cache=True)
    check_route(dtype, tokens=33, experts=128, top_k=8, normalize=True)
    check_vision_rotary(dtype, patches=37, heads=16, d=72)  # Qwen3-VL's vision heads


@pytest.mark.gpu
@pytest.mark.parametrize("cu", [[0, 64, 100, 356], [0, 1024, 2048, 3072, 3136, 4160]])
def test_vision_attention_matches_per_frame_sdpa(cu):
    """Short frames in one flash varlen call, long ones by runs of equal frames through SDPA:
    both against the reference's SDPA per frame (bf16)."""
    from models.attention import varlen_full_attention

    q, k, v = (rand(cu[-1], 16, 72, dtype=torch.bfloat16, seed=s) for s in (11, 12, 13))
    frames = vision_ops.segments(cu, q.device, q.dtype)
    assert frames.route != "reference", "torch's varlen flash attention is missing on this GPU build"
    close(vision_ops.full_varlen_attention(q, k, v, frames), varlen_full_attention(q, k, v, cu), torch.bfloat16)
