"""The FP8 linear kernel (models/kernels/fp8_linear.py) against the dequantized weights in float64.

Without CUDA it runs under the Triton interpreter (fp32 and fp16 activations); with CUDA the `gpu`
test runs bf16 at Qwen3-VL-30B-A3B's attention shapes. Outputs are poisoned first, so an unwritten
element cannot pass.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as in test_kernels_moe.py

import pytest

from models.fp8 import dequantize, quantize
from models.kernels import availability
from models.kernels.fp8_linear import Fp8LinearConfig, fp8_linear, fp8_linear_config

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or not availability.INTERPRET,
    reason="needs the Triton interpreter in this process (on CPU, test_kernels_dispatch.py runs it in a fresh one)",
)


def problem(rows: int, in_features: int, out_features: int, dtype, device="cpu", bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    w8, scale = quantize(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
    b = torch.randn(out_features, generator=gen) if bias else None
    ref = torch.nn.functional.linear(
        x.to(dtype).double(), dequantize(w8, scale, torch.float64), None if b is None else b.to(dtype).double()
    )
    cast = lambda t: None if t is None else t.to(device)
    return (cast(x.to(dtype)), cast(w8), cast(scale), cast(None if b is None else b.to(dtype))), ref


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the output: an element was never written"
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize(
    "rows,in_features,out_features,bias",
    [
        (1, 256, 384, False),  # decode: one row, whole blocks
        (5, 200, 72, True),  # partial blocks on both edges, a bias (Qwen2's q/k/v)
        (70, 320, 260, False),  # several row tiles, N across three scale rows
    ],
)
def test_fp8_linear_equals_the_dequantized_weights(poisoned_empty, rows, in_features, out_features, bias, dtype, tol):
    args, ref = problem(rows, in_features, out_features, dtype, bias=bias, seed=rows)
    for config in (fp8_linear_config(rows), Fp8LinearConfig(16, 16, 64, 4, 1)):  # K steps of 64 too
        out = fp8_linear(*args, config=config)
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel_err(out, ref) < tol, config


@interpreted
def test_fp8_linear_keeps_leading_dimensions_and_refuses_wide_k_steps(poisoned_empty):
    args, ref = problem(6, 128, 64, torch.float32)
    x, w8, scale, _ = args
    out = fp8_linear(x.view(2, 3, 128), w8, scale)
    assert out.shape == (2, 3, 64) and rel_err(out.reshape(6, 64), ref) < 1e-5
    with pytest.raises(ValueError, match="BLOCK_K dividing"):
        fp8_linear(x, w8, scale, config=Fp8LinearConfig(16, 16, 96, 4, 1))


def test_fp8_linear_without_triton_dequantizes():
    """The fallback (no CUDA, no interpreter) is the dequantized F.linear, whichever path runs here."""
    args, ref = problem(3, 128, 32, torch.float32)
    assert rel_err(fp8_linear(*args[:3]), ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 64, 1024])
@pytest.mark.parametrize("in_features,out_features", [(2048, 5120), (4096, 2048)])  # fused qkv, o_proj
def test_fp8_linear_bf16_real_shapes(rows, in_features, out_features):
    args, ref = problem(rows, in_features, out_features, torch.bfloat16, device="cuda", seed=rows)
    assert rel_err(fp8_linear(*args), ref) < 1e-2


@interpreted
def test_a_kept_fp8_model_on_the_triton_kernels_gives_the_dequantized_logits(tmp_path):
    """A tiny FP8 checkpoint loaded with keep_fp8 and run on the Triton backends (FP8 linear and
    the fused MoE's FP8 path, interpreted) against the dequantized model on the torch reference."""
    from models.backends import select_kernels, torch_kernels
    from models.forward_context import prefill_context
    from models.loader import load_model
    from models.tiny_checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path, seed=4, quantize_fp8=True, text_overrides={"num_key_value_heads": 4})
    kept = load_model(ckpt, part="language", dtype=torch.float32, keep_fp8=True).model
    kept.fuse_qkv()  # 128-row q and k: one FP8 GEMM per layer for q, k, v
    plain = load_model(ckpt, part="language", dtype=torch.float32).model
    ids = torch.tensor([5, 17, 42, 99, 3, 150, 77])
    positions = torch.arange(len(ids)).expand(3, -1)
    kernels = select_kernels("triton", "triton", None, torch.device("cpu"))
    with torch.no_grad():
        got = kept.compute_logits(kept(ids, prefill_context(kernels, [len(ids)], positions=positions)))
        want = plain.compute_logits(plain(ids, prefill_context(torch_kernels(), [len(ids)], positions=positions)))
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
