"""Where a decode step and a prefill go, kernel by kernel: the profile behind docs/kernels.md.

    python benchmarks/profile_gpu.py --layers 8      # ~1 min on one H100/H200

Builds the engine exactly as benchmarks/model_gpu.py does (random bf16 weights at the real
Qwen3-VL-30B-A3B shapes, fewer layers: every layer costs the same), then profiles with
torch.profiler:
  1. decode at batch 1 replayed from CUDA graphs: step time and the kernels inside the graph
  2. decode at batch 1 eager: the same kernels launched one by one (what a layer is made of)
  3. prefill of one 1k prompt
Each prints the kernels by GPU time with their count per layer, and the step's total kernel
time beside its wall time. Tables go to $OUT/profile_*.txt as well.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_gpu import BLOCK, Plan, build_engine, random_prompt, submit

from language_server.protocol import GenerateRequest, SamplingParams
from models.config import load_config
from models.tiny_checkpoint import write_tiny_checkpoint


def kernel_table(prof, layers: int, steps: int, title: str) -> str:
    rows = []
    total = 0.0
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if evt.device_type.name != "CUDA" or t <= 0:
            continue
        rows.append((t, evt.count, evt.key))
        total += t
    rows.sort(reverse=True)
    lines = [f"== {title}: kernel time {total / steps:.1f} us per step ({total / steps / layers:.1f} us per layer)"]
    lines.append(f"{'us/step':>9} {'us/layer':>9} {'n/layer':>8}  kernel")
    for t, n, key in rows[:40]:
        lines.append(f"{t / steps:>9.1f} {t / steps / layers:>9.2f} {n / steps / layers:>8.2f}  {key[:110]}")
    return "\n".join(lines)


def cpu_table(prof, steps: int, title: str) -> str:
    """Host time by op (self time: where the host is actually busy), per step."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    lines = [f"== {title}: host self time {total / steps:.0f} us per step", f"{'us/step':>9} {'calls/step':>10}  op"]
    for evt in rows[:25]:
        lines.append(f"{evt.self_cpu_time_total / steps:>9.1f} {evt.count / steps:>10.1f}  {evt.key[:100]}")
    return "\n".join(lines)


def launch_overheads() -> str:
    """Host microseconds per call of one small op, issued back to back without syncs."""
    from models.kernels import fused_ops, triton_fused_experts

    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(128, 1536, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(128, 2048, 768, device="cuda", dtype=torch.bfloat16) * 0.02
    logits = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    tw, tid = fused_ops.route(logits, 8, True)
    cases = {
        "torch add [1,2048]": lambda: x + x,
        "torch F.linear [1,2048]x[2048,2048]": lambda: torch.nn.functional.linear(x, gu[0, :2048]),
        "triton rms_norm": lambda: fused_ops.rms_norm(x, w, 1e-6),
        "triton add_rms_norm": lambda: fused_ops.add_rms_norm(x, x, w, 1e-6),
        "triton route": lambda: fused_ops.route(logits, 8, True),
        "triton fused experts T=1 (2 launches + sum)": lambda: triton_fused_experts(x, gu, dn, tw, tid),
    }
    lines = ["== host cost per call (no sync between calls)"]
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        lines.append(f"{host * 1e6:9.1f} us  {name}")
    return "\n".join(lines)


def decode_profile(engine, layers: int, steps: int) -> str:
    graphs = engine.runner.decode_graphs is not None
    vocab = engine.config.text.vocab_size
    req = GenerateRequest(
        f"prof-{graphs}",
        random_prompt(random.Random(0), 512, vocab),
        SamplingParams(max_tokens=10 + 2 * steps, temperature=0.0, ignore_eos=True),
    )
    submit(engine, [req])
    for _ in range(6):  # prefill + warm replays
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort(req.request_id)
    while engine.has_work():
        engine.step()
    name = "graphs" if graphs else "eager"
    return (
        f"decode B=1 {name}: wall {wall * 1e3:.3f} ms/step\n"
        + kernel_table(prof, layers, steps, f"decode B=1 {name}")
        + "\n"
        + cpu_table(prof, steps, f"decode B=1 {name}")
    )


def prefill_profile(engine, length: int, layers: int) -> str:
    vocab = engine.config.text.vocab_size

    def one(tag: str) -> None:
        req = GenerateRequest(
            f"pf-{tag}",
            random_prompt(random.Random(tag), length, vocab),
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        )
        submit(engine, [req])
        while engine.has_work():
            engine.step()

    one("warm")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    one("timed")
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one("prof")
        torch.cuda.synchronize()
    # Python-level: where the host's time goes between the ops (module calls, wrappers, engine).
    import cProfile
    import io
    import pstats

    py = cProfile.Profile()
    py.enable()
    one("python")
    torch.cuda.synchronize()
    py.disable()
    buf = io.StringIO()
    pstats.Stats(py, stream=buf).sort_stats("tottime").print_stats(30)
    return (
        f"prefill T={length}: wall {wall * 1e3:.2f} ms\n"
        + kernel_table(prof, layers, 1, f"prefill {length}")
        + "\n"
        + cpu_table(prof, 1, f"prefill {length}")
        + "\n== python, by own time\n"
        + buf.getvalue()
    )


def profile_engine(engine, graphs: bool, layers: int, args: argparse.Namespace, out: Path) -> None:
    if graphs:
        parts = (
            ("launch", launch_overheads),
            ("decode_graphs", lambda: decode_profile(engine, layers, args.steps)),
            ("prefill", lambda: prefill_profile(engine, args.prefill, layers)),
        )
    else:
        parts = (("decode_eager", lambda: decode_profile(engine, layers, 3)),)
    for name, fn in parts:
        try:
            text = fn()
        except Exception as exc:
            text = f"{name} failed: {type(exc).__name__}: {exc}"
        print(text, "\n")
        (out / f"profile_{name}.txt").write_text(text + "\n")
    engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill", type=int, default=1024)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    plan = Plan("cuda", "bfloat16", "qwen3-vl-30b-a3b", args.layers, (1,), 512, 64, (args.prefill,), (), 0, 0, 0)
    ckpt = Path(tempfile.mkdtemp(prefix="splitvl-prof-"))
    write_tiny_checkpoint(ckpt, shapes=plan.shapes, num_layers=plan.layers, metadata_only=True)
    layers = load_config(ckpt).text.num_hidden_layers
    blocks = 2 * (-(-(args.prefill + 600) // BLOCK))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"{layers} layers")
    # Two engines in turn, as a user would configure them: cuda_graphs on, then off.
    for graphs in (True, False):
        profile_engine(build_engine(ckpt, plan, blocks, graphs=graphs), graphs, layers, args, out)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
