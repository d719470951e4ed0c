"""Decode with structured outputs: tok/s at batch 1 and 16 with half the rows held to a JSON
schema, beside the same batch unconstrained, in one run on one engine.

    python benchmarks/structured_gpu.py --tokenizer-json /path/tokenizer.json   # GPU, 48 layers
    python benchmarks/structured_gpu.py --cpu-smoke                              # checks the script

The language model is Qwen3-VL-30B-A3B's with random bf16 weights built on the GPU (as in
model_gpu.py). xgrammar's mask work grows with the vocabulary, so the masks must be computed over
a vocabulary of Qwen's size: --tokenizer-json gives a byte-level BPE tokenizer of ~151k tokens
(a real Qwen tokenizer.json, or one trained offline on any text), to which Qwen's added tokens
are appended at their real ids. The schema (a list of at least 1,000 objects with a string and
an integer) keeps every constrained row decoding through the measured steps, through its
structural and string states alike. Greedy, ignore_eos; the floor of each batch is its own
unconstrained figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_gpu  # the engine build and prompts shared with the model benchmark
import torch

from language_server.protocol import Constraint, GenerateRequest, SamplingParams

SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    },
}


def decode(engine, batch: int, constrained: int, output_len: int, input_len: int, tag: str) -> dict:
    """Tok/s over the steps where all rows decode; `constrained` of the `batch` rows use SCHEMA."""
    rng = random.Random(batch)
    vocab = engine.config.text.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    reqs = [
        GenerateRequest(
            f"{tag}-{i}",
            model_gpu.random_prompt(rng, input_len, vocab),
            params,
            constraint=constraint if i < constrained else None,
        )
        for i in range(batch)
    ]
    model_gpu.submit(engine, reqs)
    sched, step_s, finished, errors = engine.scheduler, [], 0, []
    deadline = time.monotonic() + 120
    while finished < batch and time.monotonic() < deadline:
        outs = engine.poll_grammars()
        full = (
            not sched.waiting
            and len(sched.running) == batch
            and all(r.num_tokens - r.num_computed == 1 for r in sched.running)
        )
        t0 = time.perf_counter()
        outs += engine.step() if engine.has_work() else []
        elapsed = time.perf_counter() - t0
        if full:
            step_s.append(elapsed)
        for out in outs:
            finished += out.finished
            if out.finish_reason == "error":
                errors.append(out.error_message)
        if not engine.has_work():
            time.sleep(0.001)  # a compile in flight
    for r in reqs:
        engine.abort(r.request_id)
    steady = step_s[3:] or step_s
    return {
        "batch": batch,
        "constrained": constrained,
        "steps": len(steady),
        "errors": errors[:3],
        "step_ms_median": 1e3 * statistics.median(steady) if steady else None,
        "tok_s": batch * len(steady) / sum(steady) if steady else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-json", default=None, help="a ~151k byte-level BPE tokenizer.json (see above)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 48)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--output-len", type=int, default=160)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    plan_args = argparse.Namespace(cpu_smoke=smoke, layers=args.layers, quick=True)
    plan = model_gpu.make_plan(plan_args)
    batches = tuple(int(b) for b in args.batches.split(","))
    plan = model_gpu.Plan(
        **{
            **plan.__dict__,
            "batches": batches,
            "output_len": args.output_len,
            "input_len": 32 if smoke else 256,
            "prefill_lens": (64,) if smoke else (1024,),
        }
    )
    card = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    ckpt = Path(tempfile.mkdtemp(prefix="splitvl-structured-"))
    model_gpu.write_tiny_checkpoint(ckpt, shapes=plan.shapes, num_layers=plan.layers, metadata_only=True)
    vocab_words = model_gpu.wide_tokenizer(ckpt, Path(args.tokenizer_json)) if args.tokenizer_json else None
    config = model_gpu.load_config(ckpt)
    sizes = model_gpu.ModelSizes.of(config, getattr(torch, plan.dtype))
    engine = model_gpu.build_engine(ckpt, plan, model_gpu.kv_blocks(plan, sizes))
    print(
        f"{card} | {sizes.layers} layers | tokenizer vocabulary {vocab_words or 'tiny'} | xgrammar masks "
        f"over {config.text.vocab_size} logits",
        flush=True,
    )
    rows = []
    try:
        for batch in batches:
            for constrained in (0, max(1, batch // 2)):
                decode(engine, batch, constrained, 24, plan.input_len, f"warm-{batch}-{constrained}")  # compile, graphs
                row = decode(engine, batch, constrained, plan.output_len, plan.input_len, f"b{batch}-c{constrained}")
                rows.append(row)
                print(
                    f"B={batch:<3} constrained {constrained:<2} {row['tok_s'] or 0:8.1f} tok/s "
                    f"({row['step_ms_median'] or 0:.2f} ms/step over {row['steps']} steps) {row['errors'] or ''}",
                    flush=True,
                )
    finally:
        engine.close()
        shutil.rmtree(ckpt, ignore_errors=True)
    for batch in batches:
        free, held = (
            next(r for r in rows if r["batch"] == batch and (r["constrained"] > 0) == c) for c in (False, True)
        )
        if free["tok_s"] and held["tok_s"]:
            print(
                f"B={batch}: half constrained at {held['tok_s'] / free['tok_s']:.1%} of unconstrained "
                f"({held['step_ms_median'] - free['step_ms_median']:+.2f} ms/step)"
            )
    result = {
        "card": card,
        "layers": sizes.layers,
        "tokenizer_vocab": vocab_words,
        "schema": SCHEMA,
        "rows": rows,
        "torch": torch.__version__,
    }
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "structured_gpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["tok_s"] and not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
