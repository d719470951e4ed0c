"""Encode-side benchmark: our vision tower against transformers' `model.visual`, same card, same run.

    python benchmarks/encode_gpu.py               # CUDA: real Qwen3-VL-30B-A3B vision shapes, bf16
    python benchmarks/encode_gpu.py --cpu-smoke   # CPU: the tiny checkpoint in fp32, seconds

Writes a random checkpoint whose vision tower has the real shapes (27 blocks, hidden 1152,
deepstack at 8/16/24) and one text layer (transformers needs a whole model to load), then
measures images/s and tokens/s (merged output tokens, what the language side receives) for
448x448 and 1024x1024 images, one image per forward and --batch images per forward, for:
  splitvl tower         models.loader part=vision; pixel values already on the device
  transformers visual   Qwen3VLMoeForConditionalGeneration.from_pretrained(same dir).model.visual,
                        the same pixel values and grids
  splitvl service path  encode_server.runner.VisionRunner.encode: host pixel values as the
                        service's workers hand them over -> device -> forward -> one CPU tensor
                        per image (the service's vision loop per batch)
and CPU decode+preprocess per image (one thread, including the hand-over cast; the service runs a
pool of them, beside the vision loop). Before timing,
our rows are compared with transformers' on the batched input. Full numbers go to
$OUT/encode_gpu.json when OUT is set (or to --out).

Needs only torch, transformers, safetensors, pillow and numpy (and this repository on the path).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encode_server.images import decode_image
from encode_server.preprocess import PreprocessSettings, preprocess
from encode_server.runner import VisionRunner
from models.loader import load_model
from models.tiny_checkpoint import write_tiny_checkpoint

SIZES = (448, 1024)
MAX_DECODED_PIXELS = 1 << 26


def time_ms(fn: Callable[[], object], sync: Callable[[], None], budget_s: float, min_runs: int) -> float:
    """Median milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_runs or (spent < budget_s and len(samples) < 100):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return statistics.median(samples) * 1e3


def jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    pixels = (x[..., None] * 0.2 + y[..., None] * 0.3 + rng.integers(0, 48, (side, side, 3))) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def hf_rows(out) -> torch.Tensor:
    """transformers' visual() output as our layout [N, H*(1+k)] (ModelOutput in 5.2x, a tuple before)."""
    if hasattr(out, "pooler_output"):
        merged, deepstack = out.pooler_output, out.deepstack_features
    else:
        merged, deepstack = out[0], out[1]
    return torch.cat([merged, *deepstack], dim=-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny checkpoint, fp32, CPU: checks the script runs")
    parser.add_argument("--model", type=Path, help="use this checkpoint directory instead of writing one")
    parser.add_argument("--batch", type=int, default=8, help="images per forward in batched mode (default 8)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timing per row")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default $OUT/encode_gpu.json)")
    args = parser.parse_args()

    if args.cpu_smoke:
        device, dtype, shapes, budget, min_runs = torch.device("cpu"), torch.float32, "tiny", 0.05, 2
        sync = lambda: None
        card = "CPU (smoke run; numbers are not a benchmark)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; run with --cpu-smoke to check the script on a CPU", file=sys.stderr)
            return 2
        device, dtype, shapes, budget, min_runs = torch.device("cuda"), torch.bfloat16, "qwen3-vl-30b-a3b", 1.0, 5
        sync = torch.cuda.synchronize
        card = torch.cuda.get_device_name(device)
    budget = args.budget_s if args.budget_s is not None else budget

    import transformers

    with tempfile.TemporaryDirectory(prefix="encode-bench-") as tmp:
        started = time.perf_counter()
        model_dir = args.model or write_tiny_checkpoint(tmp, shapes=shapes, num_layers=1, dtype=dtype)
        written = time.perf_counter() - started
        ours = load_model(model_dir, part="vision", device=device, dtype=dtype).model
        hf = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        visual = hf.model.visual.to(device).eval()
        del hf  # the text layer is not needed past loading
        settings = PreprocessSettings.from_pretrained(model_dir)
        runner = VisionRunner(ours, device)
        host_pixel_values = getattr(runner, "host_pixel_values", lambda pv: pv)  # older trees: fp32
        print(f"card: {card}")
        print(
            f"torch {torch.__version__}, transformers {transformers.__version__}, dtype {str(dtype)[6:]}, "
            f"transformers attention: {visual.config._attn_implementation}; "
            f"checkpoint written in {written:.0f}s" + (f" ({model_dir})" if args.model else "")
        )

        rows_out: list[dict] = []
        header = f"{'image':>9} {'per fwd':>7}  {'implementation':<22}{'ms/fwd':>9}{'images/s':>10}{'tokens/s':>11}{'vs hf':>7}"
        print(header)
        print("-" * len(header))
        for side in SIZES:
            data = [jpeg(side, seed) for seed in range(args.batch)]

            def worker(d: bytes) -> tuple[torch.Tensor, tuple[int, int, int]]:  # what one encode worker does
                pixel_values, grid = preprocess(decode_image(d, max_pixels_decoded=MAX_DECODED_PIXELS), settings)
                return host_pixel_values(pixel_values), grid

            prep_ms = time_ms(lambda: worker(data[0]), lambda: None, budget, min_runs)
            images = [worker(d) for d in data]
            tokens = ours.tokens_per_image([images[0][1]])[0]

            # Correctness first: our rows against transformers' on the batched input.
            pv = torch.cat([p for p, _ in images]).to(device)
            grids = [g for _, g in images]
            with torch.inference_mode():
                diff = (
                    ours(pv, grids).float() - hf_rows(visual(pv, grid_thw=torch.tensor(grids, device=device))).float()
                )
            max_diff = diff.abs().max().item()

            for per_fwd in (1, args.batch):
                pv = torch.cat([p for p, _ in images[:per_fwd]]).to(device)
                grids = [g for _, g in images[:per_fwd]]
                grid_tensor = torch.tensor(grids, device=device)
                host = images[:per_fwd]
                with torch.inference_mode():
                    timings = {
                        "transformers visual": time_ms(
                            lambda: visual(pv, grid_thw=grid_tensor), sync, budget, min_runs
                        ),
                        "splitvl tower": time_ms(lambda: ours(pv, grids), sync, budget, min_runs),
                        "splitvl service path": time_ms(lambda: runner.encode(host), sync, budget, min_runs),
                    }
                for impl, ms in timings.items():
                    row = {
                        "image": f"{side}x{side}",
                        "per_forward": per_fwd,
                        "implementation": impl,
                        "ms": ms,
                        "images_per_s": per_fwd / ms * 1e3,
                        "tokens_per_s": per_fwd * tokens / ms * 1e3,
                        "speedup_vs_transformers": timings["transformers visual"] / ms,
                    }
                    rows_out.append(row)
                    print(
                        f"{row['image']:>9} {per_fwd:>7}  {impl:<22}{ms:>9.2f}{row['images_per_s']:>10.1f}"
                        f"{row['tokens_per_s']:>11.0f}{row['speedup_vs_transformers']:>6.2f}x"
                    )
            prep = {
                "image": f"{side}x{side}",
                "implementation": "decode+preprocess (CPU, 1 thread)",
                "ms": prep_ms,
                "images_per_s": 1e3 / prep_ms,
                "tokens_per_image": tokens,
                "max_abs_diff_vs_transformers": max_diff,
            }
            rows_out.append(prep)
            print(
                f"{prep['image']:>9} {'':>7}  {'decode+preprocess CPU':<22}{prep_ms:>9.2f}{prep['images_per_s']:>10.1f}"
                f"{'':>11}{'':>7}   ({tokens} tokens/image; max |ours - hf| = {max_diff:.3g})"
            )

    out = args.out or (Path(os.environ["OUT"]) / "encode_gpu.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.write_text(json.dumps({"card": card, "dtype": str(dtype)[6:], "rows": rows_out}, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
