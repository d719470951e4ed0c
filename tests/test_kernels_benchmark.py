"""benchmarks/kernels_gpu.py end to end at toy sizes on CPU, so the one GPU run does not die on a
typo: kernels under the Triton interpreter in fp32, timing and the ceilings stubbed out."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Must precede triton's first import. When another module imported triton first (a full
    # pytest run), these tests skip here and test_kernels_dispatch.py reruns them in a fresh process.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from models.kernels import availability

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not availability.INTERPRET,
    reason="needs the Triton interpreter in this process (on CPU, test_kernels_dispatch.py runs it in a fresh one)",
)


def test_benchmark_script_runs_small(monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_gpu.py"
    spec = importlib.util.spec_from_file_location("kernels_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, value in dict(DEVICE="cpu", DT=torch.float32, E=8, K=2, H=64, I=32, HQ=4, HKV=2, D=16, S=4).items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "time_ms", lambda calls, graph=False, budget_s=0.0: [c() for c in calls] and 1.0)
    monkeypatch.setattr(bench, "SWEEP", {k: v[:1] for k, v in bench.SWEEP.items()})
    with torch.inference_mode():
        moe = list(bench.bench_moe([1, 300], sweep=True, bandwidth=1e3, peak=1e2))
        decode = list(bench.bench_decode([1, 3], [9], bandwidth=1e3))
        prefill = list(bench.bench_prefill([5], peak=1e2))
        linear = list(bench.bench_fp8_linear([1, 5], bandwidth=1e3))
    bench.print_tables("cpu", 1e3, 1e2, moe, decode, prefill)
    out = capsys.readouterr().out
    assert "FAIL" not in out and "fused MoE" in out and "paged decode" in out and "prefill" in out
    assert [r["T"] for r in moe] == [1, 300] and len(decode) == 2 and len(prefill) == 2
    assert all(r["fp8_rel_err_vs_dequantized"] < 1e-5 for r in moe)
    assert [(r["layer"], r["M"]) for r in linear] == [("qkv", 1), ("qkv", 5), ("o_proj", 1), ("o_proj", 5)]
