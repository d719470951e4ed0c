"""The multi-GPU figures in one command: the language model over 1, 2 and 4 ranks (with and without
expert parallelism), the collectives a decode step adds, the image TTFT through both services on
two GPUs, and serving under load at TP=2 beside TP=1, each beside its same-run baseline.

    python benchmarks/multi_gpu.py                     # every part the visible GPUs allow
    python benchmarks/multi_gpu.py --parts model,collectives --tensor-parallel-sizes 1,2
    python benchmarks/multi_gpu.py --cpu-smoke         # tiny shapes, CPU ranks over gloo: checks the wiring

Parts, each in its own process (each starts with whole GPUs) and each writing JSON to $OUT/--out:
  collectives  N ranks (NCCL; gloo on the CPU) time what one decode step of the 48-layer model
               sends: 2 all-reduces of [B, 2048] bf16 per layer and the logits' all-gather, B = 1, 16, 64
  model        benchmarks/model_gpu.py --quick --tensor-parallel-size N [--expert-parallel] per layout:
               decode B = 1, 16, 64, 256 and prefill 1k, 8k; floors per rank; transformers at TP=1
  ttft         benchmarks/serve_gpu_smoke.py --language-layers 48 --tensor-parallel-size 2: one GPU
               over zmq, encode and language on two GPUs with cuda_ipc, then language TP=2 beside encode
  load         benchmarks/serve_load_gpu.py at TP=1 and TP=2, at each --concurrencies value
A layout needing more GPUs than are visible is reported as not run, with the count it needs.
Then one summary, with the issue's targets: B=1 decode at TP=2 >= 1.6x TP=1 and >= 60% of the TP=2
floor; two-GPU cuda_ipc image TTFT <= one-GPU zmq TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from serve_gpu_smoke import free_port  # this folder: the script's own

HERE = Path(__file__).resolve().parent
PARTS = ("collectives", "model", "ttft", "load")
HIDDEN, VOCAB, LAYERS = 2048, 151936, 48  # Qwen3-VL-30B-A3B's language model
COLLECTIVE_BATCHES = (1, 16, 64)


# ----- collectives ----------------------------------------------------------------------------


def _collectives_rank(rank: int, size: int, port: int, cuda: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    rows = []
    for batch in COLLECTIVE_BATCHES:
        x = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device=device)
        logits = torch.randn(batch, -(-VOCAB // size), dtype=torch.bfloat16, device=device)
        gathered = [torch.empty_like(logits) for _ in range(size)]

        def step() -> None:  # what one decode step of the model sends (models/parallel.py)
            for _ in range(2 * LAYERS):
                dist.all_reduce(x)
            dist.all_gather(gathered, logits)
            if cuda:
                torch.cuda.synchronize(device)

        step()
        times = []
        for _ in range(10 if cuda else 3):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        rows.append({"batch": batch, "step_ms": 1e3 * statistics.median(times)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def collectives(sizes: list[int], cuda: bool, out: Path) -> dict:
    import torch.multiprocessing as mp

    result = {}
    for size in [s for s in sizes if s > 1]:
        path = out / f"collectives_tp{size}.json"
        mp.start_processes(
            _collectives_rank, args=(size, free_port(), cuda, str(path)), nprocs=size, start_method="spawn"
        )
        result[size] = json.loads(path.read_text())
        for row in result[size]:
            print(f"  TP={size} B={row['batch']}: {row['step_ms']:.3f} ms per decode step of collectives")
    return result


# ----- the other parts: their own scripts ----------------------------------------------------------


def run_script(name: str, argv: list[str], timeout_s: float) -> int:
    print(f"\n######## {name}: {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, *argv], cwd=HERE.parent, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        code = 124
    print(f"######## {name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
    return code


def layouts(sizes: list[int]) -> list[tuple[int, bool]]:
    return [(size, ep) for size in sizes for ep in ((False,) if size == 1 else (False, True))]


def layout_name(size: int, ep: bool) -> str:
    return f"tp{size}{'_ep' if ep else ''}"


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----- the summary ----------------------------------------------------------------------------


def summary(out: Path, sizes: list[int], concurrencies: list[int], skipped: dict[str, str]) -> list[str]:
    lines = ["", "#### multi-GPU summary (details above and in the JSON files)"]
    lines += [f"not run: {name}: {why}" for name, why in skipped.items()]
    decode: dict[str, dict[int, dict]] = {}
    for size, ep in layouts(sizes):
        data = load_json(out / f"model_{layout_name(size, ep)}.json")
        if data:
            decode[layout_name(size, ep)] = {r["batch"]: r for r in data.get("decode_summary", [])}
            prefill = {r["tokens"]: r["ms"] for r in data.get("prefill_summary", [])}
            lines.append(
                f"{layout_name(size, ep)} prefill ms: " + ", ".join(f"{t}: {ms:.1f}" for t, ms in prefill.items())
            )
    base = decode.get("tp1", {})
    for name, rows in decode.items():
        for batch, row in rows.items():
            ours, one = row.get("graphs_tok_s"), (base.get(batch) or {}).get("graphs_tok_s")
            if ours:
                ratio = f", {ours / one:.2f}x TP=1" if one and name != "tp1" else ""
                lines.append(
                    f"{name} decode B={batch:<3} {ours:9.1f} tok/s, {row.get('pct_floor') or 0:.0f}% of its floor{ratio}"
                )
    for size in [s for s in sizes if s > 1]:
        for row in load_json(out / f"collectives_tp{size}.json") or []:
            lines.append(f"tp{size} collectives of one decode step, B={row['batch']}: {row['step_ms']:.3f} ms")
    tp2, tp1 = decode.get("tp2", {}).get(1), base.get(1)
    if tp2 and tp1 and tp2.get("graphs_tok_s") and tp1.get("graphs_tok_s"):
        speedup = tp2["graphs_tok_s"] / tp1["graphs_tok_s"]
        lines.append(
            f"target: B=1 TP=2 {speedup:.2f}x TP=1 (>= 1.6x: {'met' if speedup >= 1.6 else 'not met'}), "
            f"{tp2.get('pct_floor') or 0:.0f}% of the TP=2 floor (>= 60%: "
            f"{'met' if (tp2.get('pct_floor') or 0) >= 60 else 'not met'})"
        )
    serve = load_json(out / "serve_gpu_smoke.json")
    ttft = {}
    for name, entry in serve.items():
        if isinstance(entry, dict) and ("runs" in entry or "error" in entry):
            runs = [r["ttft_s"] for r in entry.get("runs", []) if r.get("ttft_s")]
            ttft[name] = runs[1:] or runs  # the first request warms up
            lines.append(
                f"TTFT {name}: " + (f"{[round(1e3 * t) for t in runs]} ms" if runs else entry.get("error", "-"))
            )
    one, two = ttft.get("one_gpu"), ttft.get("two_gpus_cuda_ipc")
    if one and two:
        a, b = statistics.median(two), statistics.median(one)
        lines.append(
            f"target: two-GPU cuda_ipc TTFT {1e3 * a:.0f} ms <= one-GPU zmq {1e3 * b:.0f} ms: {'met' if a <= b else 'not met'}"
        )
    for size in (1, 2):
        for c in concurrencies:
            data = load_json(out / f"serve_load_tp{size}_c{c}.json")
            group = data.get("text_only", {}).get("all")
            if group:
                lines.append(
                    f"load tp{size} c={c} text only: {group['output_throughput']:.0f} out tok/s, TPOT p50 "
                    f"{(group['tpot_ms'] or {}).get('p50') or 0:.1f} ms, TTFT p50 {(group['ttft_ms'] or {}).get('p50') or 0:.0f} ms, "
                    f"failed {group['failed']}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, CPU ranks over gloo: checks the wiring")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON files")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    parser.add_argument("--tensor-parallel-sizes", default="1,2,4", help="layouts of the model part (default 1,2,4)")
    parser.add_argument("--concurrencies", default="16,64", help="the load part's concurrency sweep")
    args = parser.parse_args(argv)
    wanted = args.parts.split(",")
    if unknown := set(wanted) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    import torch

    smoke = args.cpu_smoke
    gpus = 0 if smoke else torch.cuda.device_count()
    if not smoke and gpus == 0:
        print("no CUDA device: use --cpu-smoke to check the script on a CPU")
        return 2
    requested = [int(s) for s in args.tensor_parallel_sizes.split(",")]
    sizes = [s for s in requested if smoke or s <= gpus]
    skipped = {f"TP={s}": f"needs {s} GPUs, {gpus} visible" for s in requested if s not in sizes}
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = "cpu" if smoke else f"{gpus}x {torch.cuda.get_device_name()}"
    print(f"{card} | torch {torch.__version__} | layouts {[layout_name(*l) for l in layouts(sizes)]}", flush=True)
    failed = []
    if "collectives" in wanted:
        print("\n######## collectives", flush=True)
        try:
            collectives(sizes, not smoke, out)
        except Exception as exc:  # report and go on
            print(f"collectives failed: {type(exc).__name__}: {exc}")
            failed.append("collectives")
    scripts = []
    if "model" in wanted:
        for size, ep in layouts(sizes):
            argv = [
                str(HERE / "model_gpu.py"),
                "--cpu-smoke" if smoke else "--quick",
                "--tensor-parallel-size",
                str(size),
            ]
            argv += ["--expert-parallel"] if ep else []
            scripts.append(
                (
                    f"model {layout_name(size, ep)}",
                    argv + ["--out", str(out / f"model_{layout_name(size, ep)}.json")],
                    600,
                )
            )
    if "ttft" in wanted:
        argv = [str(HERE / "serve_gpu_smoke.py"), "--out", str(out), "--language-layers", "3" if smoke else "48"]
        argv += ["--tensor-parallel-size", "2"] if 2 in sizes else []
        argv += ["--cpu-check", "--ckpt", str(out / "smoke-tiny-ckpt")] if smoke else []
        scripts.append(("TTFT through both services", argv, 900))
    if "load" in wanted:
        tokenizer = out / "wide-tokenizer.json"
        if not smoke and not tokenizer.exists():
            scripts.append(("Qwen-sized tokenizer", [str(HERE / "train_tokenizer.py"), str(tokenizer)], 300))
        for size in [s for s in (1, 2) if s in sizes]:
            for c in concurrencies:
                argv = [str(HERE / "serve_load_gpu.py"), "--out", str(out), "--concurrency", str(c)]
                argv += ["--tensor-parallel-size", str(size), "--name", f"serve_load_tp{size}_c{c}"]
                argv += ["--cpu-check", "--num-prompts", "8"] if smoke else ["--tokenizer-json", str(tokenizer)]
                scripts.append((f"load TP={size} c={c}", argv, 900))
    for name, argv, timeout_s in scripts:
        if run_script(name, argv, timeout_s):
            failed.append(name)
    print("\n".join(summary(out, sizes, concurrencies, skipped)))
    if failed:
        print(f"parts that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
