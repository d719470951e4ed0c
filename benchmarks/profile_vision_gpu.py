"""Where a vision-tower forward goes, kernel by kernel, and what the copies around it cost.

    python benchmarks/profile_vision_gpu.py            # ~1 min on one H100/H200

Builds the tower with the real Qwen3-VL-30B-A3B vision shapes (random bf16 weights), then for 8
images per forward at 448x448 and 1024x1024: the forward's wall time beside the sum of its
kernels (the gap is host time: launches and Python), the kernels by GPU time, the host ops by
self time, and the host<->device copies of one batch (fp32 pageable, as the service did, and
bf16 pinned), and one block's attention and MLP by each way of running them. Tables go to
$OUT/profile_vision.txt as well.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encode_gpu import jpeg
from profile_gpu import cpu_table, kernel_table

from encode_server.images import decode_image
from encode_server.preprocess import PreprocessSettings, preprocess
from models.loader import load_model
from models.tiny_checkpoint import write_tiny_checkpoint


def wall_ms(fn, runs: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / runs * 1e3


def copies(pixel_values: torch.Tensor, out_rows: int, out_width: int) -> str:
    pinned = pixel_values.to(torch.bfloat16).pin_memory()
    rows = torch.randn(out_rows, out_width, device="cuda", dtype=torch.bfloat16)
    host_rows = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    cases = {
        f"H2D fp32 pageable {pixel_values.numel() * 4 / 1e6:.0f} MB": lambda: pixel_values.to("cuda"),
        f"H2D bf16 pinned {pinned.numel() * 2 / 1e6:.0f} MB": lambda: pinned.to("cuda", non_blocking=True),
        f"D2H bf16 pageable {rows.numel() * 2 / 1e6:.0f} MB": lambda: rows.cpu(),
        f"D2H bf16 pinned {rows.numel() * 2 / 1e6:.0f} MB": lambda: host_rows.copy_(rows, non_blocking=True),
        "host cast fp32 -> bf16": lambda: pixel_values.to(torch.bfloat16),
    }
    return "\n".join(f"{wall_ms(fn):9.2f} ms  {name}" for name, fn in cases.items())


def attention_variants(patches_per_image: int, images: int = 8, heads: int = 16, d: int = 72) -> str:
    """One block's attention over `images` frames, by each way torch offers to run it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.attention import varlen_full_attention
    from models.kernels.vision_ops import Segments, full_varlen_attention

    cu = [i * patches_per_image for i in range(images + 1)]
    q, k, v = (torch.randn(cu[-1], heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lengths = [patches_per_image] * images
    flash = Segments(
        cu, lengths, "flash", torch.tensor(cu, dtype=torch.int32, device="cuda")
    )  # both routes, whatever the size
    batched = [t.view(images, patches_per_image, heads, d).transpose(1, 2) for t in (q, k, v)]
    cases = {
        "flash varlen, one call (ours below 1,024 patches a frame)": lambda: full_varlen_attention(q, k, v, flash),
        "SDPA by runs of equal frames (ours from 1,024)": lambda: full_varlen_attention(
            q, k, v, Segments(cu, lengths, "runs")
        ),
        "SDPA per frame (torch's pick; the reference)": lambda: varlen_full_attention(q, k, v, cu),
    }
    for name, backend in (
        ("cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(*batched)

        cases[f"SDPA {name}, equal frames batched"] = run
    lines = [f"== attention, {images} frames of {patches_per_image} patches, {heads} heads of {d}"]
    for name, fn in cases.items():
        try:
            lines.append(f"{wall_ms(fn):9.3f} ms  {name}")
        except RuntimeError as exc:
            lines.append(f"      n/a  {name}: {str(exc).splitlines()[0][:80]}")
    return "\n".join(lines)


def mlp_variants(patches: int, hidden: int = 1152, inter: int = 4304) -> str:
    x = torch.randn(patches, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(inter, device="cuda", dtype=torch.bfloat16) * 0.02
    cases = {
        "fc1 then gelu(tanh)": lambda: torch.nn.functional.gelu(
            torch.nn.functional.linear(x, w, b), approximate="tanh"
        ),
        "fc1 with the GELU epilogue (ours)": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
    }
    return "\n".join(
        [f"== vision fc1 + gelu at {patches} patches"]
        + [f"{wall_ms(fn):9.3f} ms  {name}" for name, fn in cases.items()]
    )


def main() -> int:
    out = Path(os.environ.get("OUT", "."))
    with tempfile.TemporaryDirectory(prefix="vision-prof-") as tmp:
        model_dir = write_tiny_checkpoint(tmp, shapes="qwen3-vl-30b-a3b", num_layers=1, dtype=torch.bfloat16)
        tower = load_model(model_dir, part="vision", device=torch.device("cuda"), dtype=torch.bfloat16).model
        settings = PreprocessSettings.from_pretrained(model_dir)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"{len(tower.blocks)} vision blocks")
    texts = []
    for side in (448, 1024):
        images = [preprocess(decode_image(jpeg(side, seed), max_pixels_decoded=1 << 26), settings) for seed in range(8)]
        host = torch.cat([p for p, _ in images])
        grids = [g for _, g in images]
        pv = host.to("cuda")
        with torch.inference_mode():
            ms = wall_ms(lambda: tower(pv, grids))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    tower(pv, grids)
                torch.cuda.synchronize()
        n_out = sum(tower.tokens_per_image(grids))
        text = (
            f"vision 8x{side}x{side} ({host.shape[0]} patches): wall {ms:.2f} ms/forward\n"
            + kernel_table(prof, len(tower.blocks), 3, f"vision 8x{side}")
            + "\n"
            + cpu_table(prof, 3, f"vision 8x{side}")
            + "\n== copies of this batch\n"
            + copies(host, n_out, tower.output_width)
            + "\n"
            + attention_variants(host.shape[0] // 8)
            + "\n"
            + mlp_variants(host.shape[0])
        )
        print(text, "\n")
        texts.append(text)
    (out / "profile_vision.txt").write_text("\n\n".join(texts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
