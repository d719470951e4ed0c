"""Issue 7's benchmark in one command: the language model, the vision tower and the time to first
token through both services, on one machine, each beside its same-run baseline.

    python benchmarks/all_gpu.py                 # = splitvl bench all (one GPU: ~6 min on an H100)
    python benchmarks/all_gpu.py --cpu-smoke     # tiny shapes on the CPU: checks the wiring

Runs, one after the other and each in its own process (so each starts with the whole GPU):
  1. benchmarks/model_gpu.py      decode tok/s at B = 1, 16, 64, 256; prefill 1k and 8k;
                                  transformers on the same weights; the bandwidth floor
  2. benchmarks/encode_gpu.py     vision tower per image (448², 1024²) against transformers' visual()
  3. benchmarks/serve_gpu_smoke.py --language-layers 48
                                  TTFT of an image chat through both services: one GPU, and
                                  encode and language on two GPUs with cuda_ipc where there are two
then prints one summary table from their JSON files ($OUT or --out). A part that fails is
reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_part(name: str, argv: list[str], timeout_s: float) -> tuple[int, float]:
    print(f"\n######## {name}: {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, *argv], cwd=HERE.parent, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"{name}: stopped after {timeout_s:.0f} s", flush=True)
        code = 124
    return code, time.perf_counter() - started


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(out: Path) -> list[str]:
    lines = ["", "#### summary (each figure beside its same-run baseline; details above and in the JSON files)"]
    model = load(out / "model_gpu.json") or {}
    if model:
        lines.append(f"card: {model.get('card')} | {model.get('model', {}).get('layers')} layers")
    for row in model.get("decode_summary", []):
        ours, hf = row.get("graphs_tok_s"), row.get("hf_tok_s")
        if not ours:
            lines.append(f"decode B={row['batch']:<3} not measured (see above)")
            continue
        lines.append(f"decode B={row['batch']:<3} {ours:9.1f} tok/s   {row.get('pct_floor') or 0:3.0f}% of the floor   "
                     + (f"transformers {hf:.1f} tok/s ({ours / hf:.1f}x)" if hf else "transformers -"))
    for row in model.get("prefill_summary", []):
        if not row.get("ms"):
            continue
        hf = row.get("hf_ms")
        lines.append(f"prefill {row['tokens']:>5} tokens {row['ms']:8.1f} ms   floor {row['floor_ms']:.1f} ms"
                     + (f"   transformers {hf:.1f} ms" if hf else ""))
    forced = model.get("hf", {}).get("teacher_forced")
    if forced:
        lines.append(f"teacher-forced agreement with transformers: {forced['top1_agree']:.0%} "
                     f"(torch reference ops: {forced['reference_ops_top1_agree']:.0%})")
    encode = load(out / "encode_gpu.json") or {}
    for row in encode.get("rows", []):
        if row.get("implementation") == "splitvl tower":
            lines.append(f"vision tower {row['image']} x{row['per_forward']}: {row['ms']:.2f} ms/forward, "
                         f"{row['speedup_vs_transformers']:.2f}x transformers")
    serve = load(out / "serve_gpu_smoke.json") or {}
    for name in ("one_gpu", "two_gpus_cuda_ipc", "cpu_check"):
        runs = serve.get(name, {}).get("runs", [])
        if runs:
            ttft = [round(1e3 * (r["ttft_s"] or 0)) for r in runs]
            lines.append(f"TTFT image chat, {name}: first {ttft[0]} ms, then (new images) {ttft[1:]} ms")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the wiring, not a benchmark")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON files (default $OUT or .)")
    parser.add_argument("--language-layers", type=int, default=48, help="layers of the language model in the TTFT part")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = ["--cpu-smoke"] if args.cpu_smoke else []
    parts = [
        ("model", [str(HERE / "model_gpu.py"), *smoke, "--out", str(out / "model_gpu.json")], 600),
        ("vision tower", [str(HERE / "encode_gpu.py"), *smoke, "--out", str(out / "encode_gpu.json")], 300),
        ("TTFT through both services",
         [str(HERE / "serve_gpu_smoke.py"), "--out", str(out), "--language-layers",
          str(3 if args.cpu_smoke else args.language_layers)]
         + (["--cpu-check", "--ckpt", str(out / "smoke-tiny-ckpt")] if args.cpu_smoke else []), 600),
    ]
    failed = []
    for name, part_argv, timeout_s in parts:
        code, seconds = run_part(name, part_argv, timeout_s)
        print(f"######## {name}: exit {code} after {seconds:.0f} s", flush=True)
        if code:
            failed.append(name)
    print("\n".join(summary(out)))
    if failed:
        print(f"parts that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
