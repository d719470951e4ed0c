"""FP8 correctness at the real shapes on one GPU: the served FP8 model against the dequantized one.

    python benchmarks/fp8_gpu.py              # 4 layers of Qwen3-VL-30B-A3B in Qwen's FP8 layout
    python benchmarks/fp8_gpu.py --cpu-smoke  # tiny shapes on the CPU: checks this script

A random real-shape checkpoint is written in Qwen's block-wise FP8 layout (make-tiny --fp8).
The FP8 model runs through the engine as served (EngineCore: FP8 weights kept FP8, Triton FP8
kernels, CUDA graphs for decode); the reference is the same checkpoint dequantized to bf16 at
load (`load_model`, keep_fp8 off), greedy by whole-sequence recompute on the same GPU. For five
random prompts, 8 greedy tokens each: how many agree, and at each step where they part, the
reference's top-2 logit margin (bf16 rounding flips only near-ties; a wide margin would be a bug).
Results go to $OUT/fp8_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from language_server.engine.core import EngineCore
from language_server.protocol import GenerateRequest, SamplingParams
from language_server.settings import LanguageSettings
from models import tiny_tokenizer
from models.backends import select_kernels
from models.forward_context import prefill_context
from models.loader import load_model
from models.tiny_checkpoint import write_tiny_checkpoint

PROMPTS = 5
PROMPT_LEN = 48
NEW_TOKENS = 8
SPECIAL_IDS = frozenset(tiny_tokenizer.token_ids().values())


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    out = []
    for _ in range(PROMPTS):
        ids: list[int] = []
        while len(ids) < PROMPT_LEN:
            tok = rng.randrange(1, vocab)
            if tok not in SPECIAL_IDS:
                ids.append(tok)
        out.append(ids)
    return out


@torch.no_grad()
def reference(ckpt: Path, device: str, dtype: torch.dtype, batch: list[list[int]]) -> list[dict]:
    """The dequantized model's greedy tokens and each step's top-2 margin."""
    loaded = load_model(ckpt, part="language", device=device, dtype=dtype)
    model, config = loaded.model, loaded.config
    kernels = select_kernels("auto", "auto", None, torch.device(device))
    out = []
    for prompt in batch:
        ids, margins = list(prompt), []
        for _ in range(NEW_TOKENS):
            positions = torch.arange(len(ids), device=device)
            if config.is_vl:
                positions = positions.expand(3, -1)
            ctx = prefill_context(kernels, [len(ids)], device, positions)
            logits = model.compute_logits(model(torch.tensor(ids, device=device), ctx)[-1:])[0].float()
            top = logits.topk(2)
            margins.append((top.values[0] - top.values[1]).item())
            ids.append(int(top.indices[0]))
        out.append({"tokens": ids[len(prompt) :], "margins": margins})
    del model
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    return out


def served(ckpt: Path, device: str, dtype: str, batch: list[list[int]]) -> tuple[list[list[int]], str]:
    """Greedy tokens of the FP8 checkpoint through the engine, all prompts at once."""
    settings = LanguageSettings(model=str(ckpt), device=device, dtype=dtype, num_kv_blocks=256, max_num_seqs=8)
    engine = EngineCore(settings)
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        tokens: dict[str, list[int]] = {f"p{i}": [] for i in range(len(batch))}
        for i, ids in enumerate(batch):
            assert not engine.add_request(GenerateRequest(f"p{i}", ids, params))
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return [tokens[f"p{i}"] for i in range(len(batch))], engine.runner.weights
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke to check the script on a CPU")
        return 2
    device, dtype, shapes = ("cpu", "float32", "tiny") if smoke else ("cuda", "bfloat16", "qwen3-vl-30b-a3b")
    card = "cpu" if smoke else torch.cuda.get_device_name()
    tmp = Path(tempfile.mkdtemp(prefix="splitvl-fp8-"))
    try:
        t0 = time.perf_counter()
        ckpt = write_tiny_checkpoint(
            tmp / "fp8", shapes=shapes, num_layers=args.layers, quantize_fp8=True, progress=False
        )
        print(
            f"{card} | torch {torch.__version__} | {shapes} FP8, {args.layers} layers, written in {time.perf_counter() - t0:.0f} s"
        )
        vocab = json.loads((ckpt / "config.json").read_text()).get("text_config", {}).get("vocab_size") or 151936
        batch = prompts(min(vocab, 151936))
        ref = reference(ckpt, device, getattr(torch, dtype), batch)
        got, weights = served(ckpt, device, dtype, batch)
        print(f"served weights: {weights}")
        rows, agreeing = [], 0
        for i, (r, g) in enumerate(zip(ref, got)):
            first_diff = next((k for k, (a, b) in enumerate(zip(r["tokens"], g)) if a != b), None)
            agreeing += first_diff is None
            row = {"prompt": i, "reference": r["tokens"], "fp8": g, "first_difference": first_diff,
                   "margins": r["margins"]}  # fmt: skip
            rows.append(row)
            where = "all 8 agree" if first_diff is None else (
                f"part at step {first_diff}, where the reference's top-2 margin is {r['margins'][first_diff]:.3f}")  # fmt: skip
            print(f"  prompt {i}: {where}; margins {[round(m, 3) for m in r['margins']]}")
        verdict = "met" if agreeing >= 4 else "not met"
        print(f"{agreeing} of {PROMPTS} prompts agree on all {NEW_TOKENS} tokens (target >= 4 of 5: {verdict})")
        out = Path(os.environ.get("OUT", ".")) / "fp8_gpu.json"
        out.write_text(json.dumps({"card": card, "layers": args.layers, "weights": weights, "prompts": rows,
                                   "agreeing": agreeing}, indent=1))  # fmt: skip
        print(f"wrote {out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
