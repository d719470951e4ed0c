"""Tensor-parallel shards on one GPU: what each rank reads, holds and computes, at the real shapes.

    python benchmarks/tp_shards_gpu.py              # 4 layers of Qwen3-VL-30B-A3B, layouts TP=1, 2, 2+EP, 4+EP
    python benchmarks/tp_shards_gpu.py --cpu-smoke  # tiny shapes on the CPU: checks this script

A real-shape checkpoint (random bf16 weights in safetensors, the hub's layout) is written with
--layers layers. For each layout, N fresh rank processes each load their slices with
`load_model(..., tp=...)` onto the one GPU, then together compute the logits of a few prompts and
greedy tokens (Triton attention and MoE, as served; every step a whole prefill, no cache). Per
rank: load seconds, peak host RSS (VmHWM) before and after loading, GPU bytes of its weights.
Against TP=1 in the same run: the largest logit difference over the logits' scale, top-1 and
greedy agreement (bf16: the ranks' partial sums round differently, so small differences are
expected; tokens mostly agree).

NCCL refuses two ranks on one GPU, so the ranks join over gloo, which moves CUDA tensors through
the host: these are figures for loading and for the kernels on shards, not for collective speed
(a multi-GPU run of `splitvl bench model --tensor-parallel-size N` gives those). Results go to
$OUT/tp_shards_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_gpu_smoke import free_port

from models.backends import select_kernels
from models.forward_context import prefill_context
from models.loader import load_model
from models.parallel import TensorParallel
from models.tiny_checkpoint import write_tiny_checkpoint

LAYOUTS = [(1, False), (2, False), (2, True), (4, True)]
PROMPT_LEN = 48
PROMPTS = 3
NEW_TOKENS = 8


def memory_status() -> dict[str, int]:
    """This process's VmHWM (peak resident), RssAnon (its own memory) and RssFile (mapped file
    pages: the checkpoint's page cache it touches, shared and reclaimable), in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """The largest RssAnon and RssFile seen while it runs (sampled every 10 ms on a thread):
    VmHWM alone mixes a rank's own memory with the file pages its memory-mapped reads touch."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in memory_status().items():
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], value)
            time.sleep(0.01)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rank_main(rank: int, size: int, ep: bool, port: int, ckpt: str, device: str, dtype: str, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.zeros(1, device=dev)  # the CUDA context first: its host memory is not the load's
    before = memory_status()
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        tp = TensorParallel(rank, size, ep)
        loaded = load_model(ckpt, part="language", device=dev, dtype=getattr(torch, dtype), tp=tp)
    load_s = time.perf_counter() - t0
    model, config = loaded.model, loaded.config
    kernels = select_kernels("auto", "auto", None, dev)
    if kernels.attn.name == "triton":
        model.fuse_qkv()
    rng = random.Random(0)
    vocab = config.text.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]

    def logits_of(ids: list[int]) -> torch.Tensor:
        positions = torch.arange(len(ids), device=dev)
        if config.is_vl:
            positions = positions.expand(3, -1)
        ctx = prefill_context(kernels, [len(ids)], dev, positions)
        return model.compute_logits(model(torch.tensor(ids, device=dev), ctx))

    with torch.no_grad():
        logits = [logits_of(p).float().cpu() for p in prompts]
        greedy = []
        for p in prompts:
            ids = list(p)
            for _ in range(NEW_TOKENS):
                ids.append(int(logits_of(ids)[-1].argmax()))
            greedy.append(ids[len(p) :])
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    broadcast_ms = image_rows_broadcast_ms(size, dev) if size > 1 else {}
    row = {
        "rank": rank,
        "load_s": load_s,
        "anon_before_load": before["RssAnon"],
        "file_mapped_before_load": before["RssFile"],
        "peak_anon_during_load": sampler.peak["RssAnon"],
        "peak_file_mapped_during_load": sampler.peak["RssFile"],
        "vmhwm_after_load": memory_status()["VmHWM"],
        "weight_bytes_on_device": weight_bytes,
        "image_rows_broadcast_ms": broadcast_ms,
    }
    rows = [None] * size
    dist.all_gather_object(rows, row)
    if rank == 0:
        torch.save({"ranks": rows, "logits": logits, "greedy": greedy}, out)
    dist.destroy_process_group()


# Rows one image sends to the language model: [N, H·(1 + 3 DeepStack levels)] in bf16 at the real
# hidden size, N = 256 for a 448x448 image, 1024 for 896x896.
IMAGE_ROWS = {"448x448": 256, "896x896": 1024}


def image_rows_broadcast_ms(size: int, device: torch.device) -> dict[str, float]:
    """Median ms for rank 0 to broadcast one image's encoder rows to the other ranks, the way the
    engine sends them (ranks.py), over this script's group."""
    out = {}
    for name, rows in IMAGE_ROWS.items():
        t = torch.zeros(rows, 2048 * 4, dtype=torch.bfloat16, device=device)
        times = []
        for _ in range(11):
            dist.barrier()
            t0 = time.perf_counter()
            dist.broadcast(t, src=0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * sorted(times[1:])[len(times[1:]) // 2]
    return out


def run_layout(size: int, ep: bool, ckpt: Path, device: str, dtype: str, tmp: Path) -> dict:
    out = tmp / f"tp{size}{'-ep' if ep else ''}.pt"
    mp.start_processes(
        _rank_main, args=(size, ep, free_port(), str(ckpt), device, dtype, str(out)), nprocs=size, start_method="spawn"
    )
    return torch.load(out)


def compare(base: dict, other: dict) -> dict:
    diffs, scales, top1, agree, total = [], [], 0, 0, 0
    for a, b in zip(base["logits"], other["logits"]):
        diffs.append((a - b).abs().max().item())
        scales.append(a.abs().max().item())
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    for a, b in zip(base["greedy"], other["greedy"]):
        agree += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return {
        "max_logit_diff": max(diffs),
        "logit_scale": max(scales),
        "top1_agreement": top1 / total,
        "greedy_prefix_agreement": agree / sum(len(g) for g in base["greedy"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, torch kernels")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke to check the script on a CPU")
        return 2
    device, dtype, shapes = ("cpu", "float32", "tiny") if smoke else ("cuda:0", "bfloat16", "qwen3-vl-30b-a3b")
    card = torch.cuda.get_device_name() if not smoke else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="splitvl-tp-shards-"))
    try:
        t0 = time.perf_counter()
        ckpt = write_tiny_checkpoint(tmp / "ckpt", shapes=shapes, num_layers=args.layers, progress=False)
        files = list(ckpt.glob("*.safetensors"))
        ckpt_bytes = sum(f.stat().st_size for f in files)
        print(
            f"{card} | torch {torch.__version__} | {shapes}, {args.layers} layers: {ckpt_bytes / 2**30:.2f} GiB "
            f"in {len(files)} files, written in {time.perf_counter() - t0:.0f} s"
        )
        results = {
            "card": card,
            "torch": torch.__version__,
            "shapes": shapes,
            "layers": args.layers,
            "checkpoint_bytes": ckpt_bytes,
            "layouts": [],
        }
        base = None
        for size, ep in LAYOUTS:
            got = run_layout(size, ep, ckpt, device, dtype, tmp)
            base = base or got
            entry = {"tensor_parallel_size": size, "expert_parallel": ep, "ranks": got["ranks"], **compare(base, got)}
            results["layouts"].append(entry)
            name = f"TP={size}{' EP' if ep else ''}"
            for r in got["ranks"]:
                print(
                    f"  {name:8} rank {r['rank']}: load {r['load_s']:.1f} s, host memory of its own "
                    f"{r['anon_before_load'] / 2**30:.2f} GiB before, peak {r['peak_anon_during_load'] / 2**30:.2f} "
                    f"GiB during the load; file pages mapped {r['file_mapped_before_load'] / 2**30:.2f} -> "
                    f"{r['peak_file_mapped_during_load'] / 2**30:.2f} GiB at peak; weights on device {r['weight_bytes_on_device'] / 2**30:.2f} GiB"
                )
            if got["ranks"][0]["image_rows_broadcast_ms"]:
                ms = ", ".join(f"{k} {v:.2f}" for k, v in got["ranks"][0]["image_rows_broadcast_ms"].items())
                print(f"  {name:8} one image's encoder rows, rank 0 to the others: {ms} ms")
            print(
                f"  {name:8} vs TP=1: max |logit diff| {entry['max_logit_diff']:.3g} (scale {entry['logit_scale']:.3g}), "
                f"top-1 {entry['top1_agreement']:.1%}, greedy prefix {entry['greedy_prefix_agreement']:.1%}"
            )
        out = Path(os.environ.get("OUT", ".")) / "tp_shards_gpu.json"
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
