"""Serving under load through both services on one GPU, with `splitvl bench serve`'s generator:
does an image burst stall decoding? The reason the encoder is split out.

    python benchmarks/serve_load_gpu.py                # one GPU: ~4 min on an H200
    python benchmarks/serve_load_gpu.py --cpu-check    # tiny model on the CPU: checks the script
    python benchmarks/serve_load_gpu.py --tensor-parallel-size 2   # the language model on GPUs 0-1

Both services run as users run them (`splitvl encode`, `splitvl language`): the encoder with the
real Qwen3-VL-30B-A3B vision tower (random weights, from a checkpoint written here), the language
service with all 48 layers built with random bf16 weights on the GPU. Two runs at one
concurrency, each request ~150 words of text and `--output-len` tokens (ignore_eos, temperature 1):
  A. text only;
  B. half the requests carry one unique 448×448 image (no encoder or prefix cache hit).
Reported: TTFT, TPOT, ITL, output throughput, errors, with text requests' TPOT in B beside A
(the baseline measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_gpu_smoke  # noqa: E402
from model_gpu import wide_tokenizer  # noqa: E402

from splitvl.loadgen import dataset, report  # noqa: E402
from splitvl.loadgen.client import request_body  # noqa: E402
from splitvl.loadgen.load import Pacing, Target, run  # noqa: E402


def start_services(
    ckpt: Path, lang_ckpt: Path, device: str, dtype: str, logs: Path, max_num_seqs: int, tensor_parallel_size: int = 1
):
    """The encoder on `device`; the language service's ranks on it and the GPUs after it."""
    dummy = {"load_format": "dummy"} if device != "cpu" else {}  # random weights at the real shapes
    settings = {"kv_cache_memory_fraction": 0.5, "max_model_len": 4096, "max_num_seqs": max_num_seqs,
                "max_queued_requests": 1024, "tensor_parallel_size": tensor_parallel_size, **dummy}  # fmt: skip
    return serve_gpu_smoke.start_services(ckpt, lang_ckpt, device, device, dtype, logs, settings)


def load(base: str, requests: list, concurrency: int) -> tuple[dict, float]:
    target = Target(
        url=f"{base}/v1/chat/completions",
        model=_model(base),
        api_key=None,
        timeout_s=600,
        body=lambda r: request_body(target.model, r, ignore_eos=True, temperature=1.0),
    )
    outcomes, duration = asyncio.run(run(target, requests, Pacing(concurrency=concurrency), progress=False))
    return report.report(outcomes, duration, {}), duration


def _model(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=192)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--tokenizer-json",
        default=None,
        help="a ~151k byte-level BPE tokenizer.json for the language checkpoint (see structured_gpu.py): "
        "without one, most of the random model's tokens are ids the tiny tokenizer has no text for",
    )
    p.add_argument("--cpu-check", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="the language service's ranks (GPUs 0..N-1)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--name", default="serve_load_gpu", help="the JSON file's name in --out (without .json)")
    args = p.parse_args(argv)
    import torch

    from models.tiny_checkpoint import write_tiny_checkpoint

    cpu = args.cpu_check
    work = Path(tempfile.mkdtemp(prefix="splitvl-load-"))
    ckpt, lang_ckpt = work / "vision", work / "language"
    t0 = time.time()
    if cpu:
        write_tiny_checkpoint(ckpt, seed=0)
        lang_ckpt = ckpt
    else:
        # The encoder reads only the vision tower; one language layer keeps the file small.
        write_tiny_checkpoint(ckpt, shapes="qwen3-vl-30b-a3b", num_layers=1, progress=False)
        write_tiny_checkpoint(lang_ckpt, shapes="qwen3-vl-30b-a3b", metadata_only=True)
        if args.tokenizer_json:
            wide_tokenizer(lang_ckpt, Path(args.tokenizer_json))
    print(f"checkpoints in {time.time() - t0:.0f} s", flush=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not cpu else "cpu"
    words, image = (24, "64x64") if cpu else (150, "448x448")
    text = dataset.random_requests(args.num_prompts, words, args.output_len, seed=1)
    mixed = dataset.random_requests(
        args.num_prompts,
        words,
        args.output_len,
        image_sizes=dataset.parse_sizes(image),
        images_per_request=1,
        image_fraction=0.5,
        seed=2,
    )
    result: dict = {
        "card": card,
        "concurrency": args.concurrency,
        "num_prompts": args.num_prompts,
        "output_len": args.output_len,
        "words": words,
        "image": image,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    enc, lang, base = start_services(
        ckpt,
        lang_ckpt,
        "cpu" if cpu else "cuda:0",
        "float32" if cpu else "bfloat16",
        work,
        args.concurrency,
        args.tensor_parallel_size,
    )
    try:
        # Warm-up with other prompts and images: first-use compiles and graph replays, no cache hits later.
        warm = dataset.random_requests(
            8, words, 8, image_sizes=dataset.parse_sizes(image), images_per_request=1, image_fraction=0.5, seed=99
        )
        load(base, warm, 8)
        for name, requests in (("text_only", text), ("half_images", mixed)):
            groups, duration = load(base, requests, args.concurrency)
            result[name] = groups
            print(report.format_table(f"{name}, concurrency {args.concurrency}", groups, duration), flush=True)
    finally:
        serve_gpu_smoke.stop_services(lang, enc)
    base_tpot = (result["text_only"]["all"]["tpot_ms"] or {}).get("p50")
    mixed_tpot = (result["half_images"].get("text", result["half_images"]["all"])["tpot_ms"] or {}).get("p50")
    if base_tpot and mixed_tpot:
        result["text_tpot_p50_ratio"] = mixed_tpot / base_tpot
        print(
            f"\n{card}: text requests' TPOT p50 {mixed_tpot:.1f} ms with half the requests carrying an image, "
            f"{base_tpot:.1f} ms text only: {mixed_tpot / base_tpot:.2f}x (target <= 1.25x)"
        )
    errors = sum(result[n]["all"]["failed"] for n in ("text_only", "half_images"))
    print(f"errors: {errors}")
    Path(args.out, f"{args.name}.json").write_text(json.dumps(result, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
