"""Which path the kernel entry points take on a CPU machine, each checked in a fresh process
(triton fixes interpreter or compiled mode when a function is defined, so it must be chosen
before triton's first import):

- without TRITON_INTERPRET they are the torch references;
- with it, the interpreter suites (test_kernels_moe/attention/benchmark/fused_ops.py) run here when
  something else imported triton before those modules could set the variable (a full pytest run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.kernels import availability

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import torch
from models.attention import PagedKVCache, TorchAttentionBackend
from models.kernels import TritonAttentionBackend, paged_decode_attention, triton_fused_experts, use_triton
from models.kernels.paged_attention import _torch_paged_decode
from models.moe import torch_fused_experts

torch.manual_seed(0)
x = torch.randn(5, 32)
assert not use_triton(x)
gate_up, down = torch.randn(4, 32, 32), torch.randn(4, 32, 16)
weights, ids = torch.rand(5, 2), torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0]])
experts_args = (x, gate_up, down, weights, ids)
assert torch.equal(triton_fused_experts(*experts_args), torch_fused_experts(*experts_args))

q, k_cache, v_cache = torch.randn(2, 4, 16), torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16)
tables, lens = torch.tensor([[0, 2], [5, 1]]), torch.tensor([7, 3])
decode_args = (q, k_cache, v_cache, tables, lens)
assert torch.equal(paged_decode_attention(*decode_args), _torch_paged_decode(*decode_args))

outs = []
for backend_cls in (TorchAttentionBackend, TritonAttentionBackend):
    torch.manual_seed(1)
    cache = PagedKVCache(1, 6, 4, 2, 16, torch.float32, "cpu")
    backend = backend_cls(cache)
    for step in (([5, 3], [5, 3], torch.tensor([0, 1, 2, 3, 4, 8, 9, 10])), ([1, 1], [6, 4], torch.tensor([5, 11]))):
        batch = backend.prepare(*step, torch.tensor([[0, 1], [2, 3]]))
        n = batch.num_tokens
        rope = (torch.ones(n, 16), torch.zeros(n, 16))
        outs.append(backend.forward(0, torch.randn(n, 4, 16), torch.randn(n, 2, 16), torch.randn(n, 2, 16), None,
                                    1e-6, rope, batch))
assert all(torch.equal(a, b) for a, b in zip(outs[:2], outs[2:]))

from models import ops
from models.kernels import FUSED_OPS, fused_ops
h, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.rand(32) + 0.5
assert torch.equal(FUSED_OPS.rms_norm(h, w, 1e-6), ops.torch_rms_norm(h, w, 1e-6))
assert all(torch.equal(a, b) for a, b in zip(FUSED_OPS.add_rms_norm(h, r, w, 1e-6), ops.torch_add_rms_norm(h, r, w, 1e-6)))
assert all(torch.equal(a, b) for a, b in zip(fused_ops.route(h, 3, True), ops.torch_route(h, 3, True)))
print("fallbacks ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_without_interpreter_uses_torch_references():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fallbacks ok" in result.stdout


INTERPRETER_SUITES = [
    "tests/test_kernels_moe.py",
    "tests/test_kernels_fp8_linear.py",
    "tests/test_kernels_attention.py",
    "tests/test_kernels_benchmark.py",
    "tests/test_kernels_fused_ops.py",
]


@pytest.mark.skipif(
    torch.cuda.is_available() or not availability.HAS_TRITON or availability.INTERPRET,
    reason="no CPU triton, or the interpreter suites already run in this process",
)
def test_interpreter_suites_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *INTERPRETER_SUITES]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "needs the Triton interpreter" not in result.stdout, "the fresh process did not run the interpreter"
