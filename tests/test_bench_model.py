"""`splitvl bench model --cpu-smoke`: the GPU model benchmark end to end at tiny shapes on the CPU
(engine with the uncaptured graph path and the eager path, prefill, transformers on the shared
weights, floors and the table), so the one GPU run does not die on a typo. In a fresh process:
the benchmark sets runner switches and imports triton, neither of which should leak into other
tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench_model(out: Path, *flags: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-m", "splitvl", "bench", "model", "--cpu-smoke", "--out", str(out), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    return bench_model(tmp_path_factory.mktemp("bench") / "model.json")


def test_cpu_smoke_runs_every_section(one_rank_run):
    data, stdout = one_rank_run
    assert data["errors"] == {} and data["skipped"] == []
    assert [(r["batch"], r["graphs"]) for r in data["decode"]] == [(b, g) for g in (True, False) for b in (1, 3, 4)]
    assert all(r["tok_s"] > 0 and r["decode_steps"] > 0 for r in data["decode"])
    assert data["graph_buckets"][:3] == [1, 2, 4]
    # The graph path and the eager path produce the same greedy tokens; so does transformers.
    assert all(r["graph_eager_token_agreement"] == 1.0 for r in data["decode_summary"])
    assert data["hf_greedy_agreement_b1"] == len(data["hf"]["decode"][0]["tokens0"])
    forced = data["hf"]["teacher_forced"]  # fp32 on the CPU: the same token everywhere, logits ~1e-6 apart
    assert forced["top1_agree"] == 1.0 and forced["hf_top1_self"] == 1.0 and forced["logits_rel_err"] < 1e-4
    assert [r["tokens"] for r in data["prefill_summary"]] == [32, 64]
    assert all(r["floor_ms"] > 0 for r in data["prefill_summary"])
    assert "decode tok/s" in stdout and "prefill" in stdout


def test_tensor_parallel_smoke_decodes_the_one_rank_tokens(one_rank_run, tmp_path):
    """`--tensor-parallel-size 2`: two CPU ranks over gloo, the same seeded random weights split;
    every decode run's greedy tokens equal the one-rank run's, and transformers is left out by name."""
    data, stdout = bench_model(tmp_path / "tp2.json", "--tensor-parallel-size", "2")
    assert data["errors"] == {} and data["plan"]["tensor_parallel_size"] == 2
    one = {(r["batch"], r["graphs"]): r["generated_sha1"] for r in one_rank_run[0]["decode"]}
    two = {(r["batch"], r["graphs"]): r["generated_sha1"] for r in data["decode"]}
    assert two == one
    assert "hf" not in data and "left out at tensor_parallel_size > 1" in stdout


def test_all_in_one_benchmark_runs_every_part_on_cpu(tmp_path):
    """`splitvl bench all --cpu-smoke`: the model, vision-tower and service-path, TTFT and load
    parts each run and land in one summary (tiny shapes; the numbers mean nothing on a CPU)."""
    done = subprocess.run(
        [sys.executable, "-m", "splitvl", "bench", "all", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("#### summary") :]
    assert "decode B=1 " in summary and "prefill " in summary and "teacher-forced agreement" in summary
    assert "tower 448x448 x1" in summary and "service path 448x448 x8" in summary
    assert "TTFT image chat, cpu_check" in summary
    assert "load c=64 half_images (text)" in summary and "load: text TPOT p50 with images / text only" in summary
    for name in ("model_gpu.json", "encode_gpu.json", "serve_gpu_smoke.json", "serve_load_gpu.json"):
        assert (tmp_path / name).is_file(), name


def test_transfer_benchmark_still_registered():
    done = subprocess.run(
        [sys.executable, "-m", "splitvl", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "transfer" in done.stdout and "model" in done.stdout


def test_multi_gpu_script_runs_every_part_on_cpu_ranks(tmp_path):
    """benchmarks/multi_gpu.py (issue 17's one command) with tiny shapes on CPU ranks over gloo:
    collectives, the model at TP=1 and TP=2 with and without EP, TTFT with the language service
    over two ranks, load at TP=1 and TP=2; each lands in the summary (the numbers mean nothing)."""
    argv = ["--cpu-smoke", "--tensor-parallel-sizes", "1,2", "--concurrencies", "4", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "benchmarks/multi_gpu.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("#### multi-GPU summary") :]
    for line in ("tp2 collectives of one decode step, B=1", "tp2_ep decode B=1", "TTFT cpu_check_tp2",
                 "load tp2 c=4 text only", "target: B=1 TP=2"):  # fmt: skip
        assert line in summary, line
    assert "failed 0" in summary and "parts that failed" not in done.stdout
