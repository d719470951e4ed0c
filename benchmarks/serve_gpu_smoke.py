"""GPU smoke of the two services: real Qwen3-VL-30B-A3B shapes, random bf16 weights.

1. Writes `make-tiny --shapes qwen3-vl-30b-a3b --layers 4` to local disk (unless it exists).
2. Greedy reference on the CPU in fp32 (splitvl's offline generator on the same weights).
3. Serves image chats through the real processes, in bf16:
   a. encode and language on one GPU (zmq results);
   b. encode on GPU 0, language on GPU 1, results by cuda_ipc (with one GPU: both on it, still
      through cuda_ipc).
   Each answers through the official openai client; we compare the first greedy token ids to
   the fp32 reference and time the time-to-first-token of the image request.

Why a prefix and not all tokens: bf16 and fp32 differ by ~1e-2 in the logits after 4 layers;
a token whose top-2 margin is smaller than that may flip, and after one flip the sequences
diverge. We print each step's fp32 top-2 margin so a mismatch can be judged: a mismatch at a
step whose margin is > 0.5 would be a bug; at a margin < 0.1 it is rounding.

Run on a GPU machine from the repo root:  python benchmarks/serve_gpu_smoke.py [--ckpt DIR]
TTFT at the real scale (48 layers, random weights built on the language GPU, no comparison):
    python benchmarks/serve_gpu_smoke.py --language-layers 48
With --tensor-parallel-size N (N >= 2) one more setup runs: encode on GPU 0, the language model
over N ranks on GPUs 1..N (GPUs 0..N-1 when there are only N), results by cuda_ipc to rank 0;
on the CPU (--cpu-check), N CPU ranks over zmq.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_TOKENS = 8
PROMPT = "Describe this image."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, 448)[None, :, None] * np.ones((448, 1, 3))
    pixels = np.clip(grad * 0.6 + rng.integers(0, 100, (448, 448, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def reference(ckpt: Path, image_path: Path) -> tuple[list[int], list[float]]:
    """fp32 CPU greedy tokens and each step's top-2 logit margin."""
    from transformers import AutoTokenizer

    from splitvl.offline import OfflineGenerator, load_image

    gen = OfflineGenerator(ckpt, device="cpu", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    image = load_image(ckpt, image_path)
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = gen.expand_image_tokens(tok(text, add_special_tokens=False)["input_ids"], [image.grid])
    margins: list[float] = []
    model = gen.model
    original = model.compute_logits

    def spy(hidden):
        logits = original(hidden)
        top2 = logits[-1].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
        return logits

    model.compute_logits = spy
    out = gen.generate_ids(ids, [image], max_tokens=MAX_TOKENS)
    model.compute_logits = original
    return out, margins


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # not up yet
            pass
        time.sleep(1)
    raise TimeoutError(url)


def start_services(
    ckpt: Path,
    lang_ckpt: Path,
    enc_device: str,
    lang_device: str,
    dtype: str,
    log_dir: Path,
    language_settings: dict,
    result_transport: str = "zmq",
    tag: str = "",
) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """Both services as a user starts them (`splitvl encode`, `splitvl language --config`), once
    healthy: (encoder, language service, base URL). Logs go to log_dir/{encode,language}{tag}.log."""
    enc_port, enc_http, api_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    encode_args = ["--listen", f"tcp://127.0.0.1:{enc_port}", "--http-port", str(enc_http)]
    encode_args += ["--device", enc_device, "--dtype", dtype, "--result-transport", result_transport]
    enc = subprocess.Popen(
        [sys.executable, "-m", "splitvl", "encode", "--model", str(ckpt), *encode_args],
        stdout=open(log_dir / f"encode{tag}.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    cfg = log_dir / f"language{tag}.yaml"
    cfg.write_text(json.dumps({"result_transport": result_transport, **language_settings}))
    language_args = ["--encoder", f"tcp://127.0.0.1:{enc_port}", "--port", str(api_port)]
    language_args += ["--device", lang_device, "--dtype", dtype, "--config", str(cfg)]
    lang = subprocess.Popen(
        [sys.executable, "-m", "splitvl", "language", "--model", str(lang_ckpt), *language_args],
        stdout=open(log_dir / f"language{tag}.log", "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{enc_http}/health", enc)
        wait_http(f"http://127.0.0.1:{api_port}/health", lang)
    except BaseException:
        stop_services(lang, enc)
        raise
    return enc, lang, f"http://127.0.0.1:{api_port}"


def stop_services(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def serve_and_ask(
    ckpt: Path,
    data_urls: list[str],
    enc_device: str,
    lang_device: str,
    result_transport: str,
    log_dir: Path,
    dtype: str = "bfloat16",
    lang_ckpt: Path | None = None,
    tensor_parallel_size: int = 1,
) -> dict:
    """`lang_ckpt`: a config-only checkpoint the language service builds with random weights on
    its GPU (load_format: dummy), for the full 48 layers without 61 GB of files.
    `tensor_parallel_size`: the language service's ranks, on `lang_device` and the GPUs after it."""
    from openai import OpenAI

    # Over cuda_ipc, the lease configs/qwen3-vl-30b-a3b-2gpu.yaml ships with.
    lease = {"result_lease_mib": 512} if result_transport == "cuda_ipc" else {}
    dummy = {"load_format": "dummy"} if lang_ckpt is not None else {}
    settings = {"kv_cache_memory_fraction": 0.3, "max_model_len": 4096, **lease, **dummy}
    settings["tensor_parallel_size"] = tensor_parallel_size
    enc, lang, base = start_services(
        ckpt,
        lang_ckpt or ckpt,
        enc_device,
        lang_device,
        dtype,
        log_dir,
        settings,
        result_transport,
        f"_{result_transport}" + (f"_tp{tensor_parallel_size}" if tensor_parallel_size > 1 else ""),
    )
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        results = []
        for attempt in range(3):  # the first warms up; later ones hit the encoder cache (same image)
            data_url = data_urls[attempt % len(data_urls)]
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ]
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=messages,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
            ttft = None
            for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content is not None:
                    ttft = time.perf_counter() - start
            resp = client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=messages,
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            token_ids = (resp.choices[0].model_extra or {}).get("token_ids")
            results.append({"ttft_s": ttft, "token_ids": token_ids, "text": resp.choices[0].message.content})
        return {"runs": results}
    finally:
        stop_services(lang, enc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="/tmp/qwen3-vl-30b-a3b-4layers")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--cpu-check", action="store_true", help="tiny checkpoint, fp32, CPU: checks the script")
    parser.add_argument(
        "--language-layers",
        type=int,
        default=None,
        help="TTFT at scale: the language service runs this many layers with random weights "
        "built on its GPU (no reference comparison: a different model)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="N >= 2: one more setup, the language model over N ranks (GPUs 1..N, or 0..N-1 with N GPUs)",
    )
    args = parser.parse_args()
    out_dir = Path(args.out)
    ckpt = Path(args.ckpt)
    t0 = time.time()
    if not (ckpt / "config.json").exists():
        from models.tiny_checkpoint import write_tiny_checkpoint

        if args.cpu_check:
            write_tiny_checkpoint(ckpt, seed=0)
        else:
            write_tiny_checkpoint(ckpt, shapes="qwen3-vl-30b-a3b", num_layers=4, progress=False)
    print(f"checkpoint ready in {time.time() - t0:.0f}s", flush=True)
    image_path = out_dir / "smoke.png"
    image_path.write_bytes(make_image())
    data_urls = ["data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()]
    if args.language_layers:  # at scale, a new image per request: no encoder-cache or prefix-cache hit
        data_urls += ["data:image/png;base64," + base64.b64encode(make_image(seed)).decode() for seed in (1, 2)]

    lang_ckpt = None
    if args.language_layers:
        from models.tiny_checkpoint import write_tiny_checkpoint

        lang_ckpt = Path(f"{ckpt}-language-{args.language_layers}layers")
        write_tiny_checkpoint(
            lang_ckpt,
            shapes="tiny" if args.cpu_check else "qwen3-vl-30b-a3b",
            num_layers=args.language_layers,
            metadata_only=True,
        )
        ref, margins = [], []
    else:
        t0 = time.time()
        ref, margins = reference(ckpt, image_path)
        print(f"fp32 CPU reference in {time.time() - t0:.0f}s: {ref}", flush=True)
        print("fp32 top-2 margins per step:", [round(m, 3) for m in margins], flush=True)

    report = {
        "reference": ref,
        "margins": margins,
        "language_layers": args.language_layers,
        "cards": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    dtype = "float32" if args.cpu_check else "bfloat16"
    gpus = torch.cuda.device_count()
    setups = [("cpu_check", "cpu", "cpu", "zmq", 1)] if args.cpu_check else [("one_gpu", "cuda:0", "cuda:0", "zmq", 1)]
    if gpus >= 2 and not args.cpu_check:
        setups.append(("two_gpus_cuda_ipc", "cuda:0", "cuda:1", "cuda_ipc", 1))
    elif not args.cpu_check:  # one GPU: cuda_ipc between the two processes on it, the same code path
        setups.append(("one_gpu_cuda_ipc", "cuda:0", "cuda:0", "cuda_ipc", 1))
    tp = args.tensor_parallel_size
    if tp > 1 and args.cpu_check:
        setups.append((f"cpu_check_tp{tp}", "cpu", "cpu", "zmq", tp))
    elif tp > 1 and gpus >= tp:
        lang_dev = "cuda:1" if gpus > tp else "cuda:0"  # the encoder alone on GPU 0 when there is room
        setups.append((f"tp{tp}_cuda_ipc", "cuda:0", lang_dev, "cuda_ipc", tp))
    elif tp > 1:
        report[f"tp{tp}_cuda_ipc"] = {"error": f"needs {tp} GPUs, {gpus} visible"}
    for name, enc_dev, lang_dev, transport, ranks in setups:
        t0 = time.time()
        try:
            result = serve_and_ask(ckpt, data_urls, enc_dev, lang_dev, transport, out_dir, dtype, lang_ckpt, ranks)
        except Exception as exc:  # report and go on to the next setup
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["wall_s"] = time.time() - t0
        report[name] = result
        runs = result.get("runs", [])
        for run in runs:
            got = run["token_ids"] or []
            agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            run["agreeing_prefix"] = agree if ref else None
        print(name, json.dumps(result), flush=True)
    (out_dir / "serve_gpu_smoke.json").write_text(json.dumps(report, indent=1))
    print(f"\nsetup               agreeing prefix (of {MAX_TOKENS})   TTFT image request (s)")
    for name in [k for k in report if isinstance(report[k], dict) and ("runs" in report[k] or "error" in report[k])]:
        runs = report[name].get("runs", [])
        print(
            f"{name:20s} {[r.get('agreeing_prefix') for r in runs]!s:26s} {[round(r['ttft_s'] or -1, 3) for r in runs]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
