"""The speed figures in one command: the language model, the vision tower and its service path,
the time to first token through both services, and both services under load, on one machine,
each beside its same-run baseline.

    python benchmarks/all_gpu.py                 # = splitvl bench all (one GPU: ~14 min on an H200)
    python benchmarks/all_gpu.py --parts model,encode    # some parts (a lent machine's call limit)
    python benchmarks/all_gpu.py --cpu-smoke     # tiny shapes on the CPU: checks the wiring

Runs, one after the other and each in its own process (so each starts with the whole GPU):
  1. benchmarks/model_gpu.py      decode tok/s at B = 1, 16, 64, 256; prefill 1k and 8k;
                                  transformers on the same weights; the bandwidth floor
  2. benchmarks/encode_gpu.py     vision tower and the encode service's path (8 images per forward,
                                  448² and 1024²) against transformers' visual() on the same images
  3. benchmarks/serve_gpu_smoke.py --language-layers 48
                                  TTFT of an image chat through both services: one GPU, and
                                  encode and language on two GPUs with cuda_ipc where there are two
  4. benchmarks/serve_load_gpu.py concurrency 64, half the requests with a unique 448² image, beside
                                  text only (a Qwen-sized tokenizer is trained first:
                                  benchmarks/train_tokenizer.py)
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
PARTS = ("model", "encode", "ttft", "load")


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
        lines.append(
            f"decode B={row['batch']:<3} {ours:9.1f} tok/s   {row.get('pct_floor') or 0:3.0f}% of the floor   "
            + (f"transformers {hf:.1f} tok/s ({ours / hf:.1f}x)" if hf else "transformers -")
        )
    for row in model.get("prefill_summary", []):
        if not row.get("ms"):
            continue
        hf = row.get("hf_ms")
        lines.append(
            f"prefill {row['tokens']:>5} tokens {row['ms']:8.1f} ms   floor {row['floor_ms']:.1f} ms"
            + (f"   transformers {hf:.1f} ms" if hf else "")
        )
    forced = model.get("hf", {}).get("teacher_forced")
    if forced:
        lines.append(
            f"teacher-forced agreement with transformers: {forced['top1_agree']:.0%} "
            f"(torch reference ops: {forced['reference_ops_top1_agree']:.0%})"
        )
    encode = load(out / "encode_gpu.json") or {}
    for row in encode.get("rows", []):
        if row.get("implementation") in ("splitvl tower", "splitvl service path"):
            lines.append(
                f"{row['implementation'].removeprefix('splitvl ')} {row['image']} x{row['per_forward']}: "
                f"{row['ms']:.2f} ms/forward, {row['speedup_vs_transformers']:.2f}x transformers"
            )
    serve = load(out / "serve_gpu_smoke.json") or {}
    for name in ("one_gpu", "two_gpus_cuda_ipc", "cpu_check"):
        runs = serve.get(name, {}).get("runs", [])
        if runs:
            ttft = [round(1e3 * (r["ttft_s"] or 0)) for r in runs]
            lines.append(f"TTFT image chat, {name}: first {ttft[0]} ms, then (new images) {ttft[1:]} ms")
    load_run = load(out / "serve_load_gpu.json") or {}
    for name in ("text_only", "half_images"):
        groups = load_run.get(name, {})
        for group in ("all", "text", "image") if name == "half_images" else ("all",):
            g = groups.get(group)
            if g:
                lines.append(
                    f"load c={load_run['concurrency']} {name} ({group}): {g['output_throughput']:.0f} out tok/s, "
                    f"TPOT p50 {(g['tpot_ms'] or {}).get('p50') or 0:.1f} ms, "
                    f"TTFT p50 {(g['ttft_ms'] or {}).get('p50') or 0:.0f} ms, failed {g['failed']}"
                )
    if load_run.get("text_tpot_p50_ratio"):
        lines.append(
            f"load: text TPOT p50 with images / text only = {load_run['text_tpot_p50_ratio']:.2f}x (target <= 1.25x)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the wiring, not a benchmark"
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT", "."), help="folder for the JSON files (default $OUT or .)"
    )
    parser.add_argument("--language-layers", type=int, default=48, help="layers of the language model in the TTFT part")
    parser.add_argument(
        "--quick", action="store_true", help="the model part with fewer generated tokens (model_gpu.py --quick)"
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma list of parts to run (default: all of {','.join(PARTS)})"
    )
    args = parser.parse_args(argv)
    wanted = args.parts.split(",")
    if unknown := set(wanted) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = ["--cpu-smoke"] if args.cpu_smoke else []
    tokenizer = out / "wide-tokenizer.json"
    parts = {
        "model": [
            (
                "model",
                [
                    str(HERE / "model_gpu.py"),
                    *smoke,
                    *(["--quick"] if args.quick else []),
                    "--out",
                    str(out / "model_gpu.json"),
                ],
                600,
            )
        ],
        "encode": [
            (
                "vision tower and service path",
                [str(HERE / "encode_gpu.py"), *smoke, "--out", str(out / "encode_gpu.json")],
                300,
            )
        ],
        "ttft": [
            (
                "TTFT through both services",
                [
                    str(HERE / "serve_gpu_smoke.py"),
                    "--out",
                    str(out),
                    "--language-layers",
                    str(3 if args.cpu_smoke else args.language_layers),
                ]
                + (["--cpu-check", "--ckpt", str(out / "smoke-tiny-ckpt")] if args.cpu_smoke else []),
                600,
            )
        ],
        "load": (
            []
            if args.cpu_smoke or tokenizer.exists()
            else [("Qwen-sized tokenizer", [str(HERE / "train_tokenizer.py"), str(tokenizer)], 300)]
        )
        + [
            (
                "both services under load",
                [str(HERE / "serve_load_gpu.py"), "--out", str(out)]
                + (["--cpu-check", "--num-prompts", "16"] if args.cpu_smoke else ["--tokenizer-json", str(tokenizer)]),
                900,
            )
        ],
    }
    failed = []
    for name, part_argv, timeout_s in [step for part in wanted for step in parts[part]]:
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
