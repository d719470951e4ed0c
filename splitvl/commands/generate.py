"""`splitvl generate`: offline greedy generation on a local checkpoint."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="offline greedy generation (a smoke test for any checkpoint)",
        description="Greedy generation without any service: images go before the prompt in one user "
        "message, the chat template's generation prompt is applied, and generation stops at EOS or "
        "--max-tokens. With --disaggregated the vision tower and the language model are loaded "
        "separately and the image rows cross transfer/'s codec as bytes, as between the two services.",
    )
    p.add_argument(
        "--model",
        help="checkpoint directory (config.json, safetensors, tokenizer); default: the tiny "
        "demo checkpoint `splitvl up` serves (built into the cache directory if missing)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the demo checkpoint lives (default $SPLITVL_CACHE, else ~/.cache/splitvl)",
    )
    p.add_argument("--prompt", required=True, help="the user's text")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several")
    p.add_argument("--max-tokens", type=int, default=32, help="most new tokens to generate (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights and activations dtype (default float32, the reference precision)",
    )
    p.add_argument("--disaggregated", action="store_true", help="vision tower -> wire codec -> language model")
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="ranks the language model is split across (LanguageSettings.tensor_parallel_size); "
        "generate runs the model in its own process, so only 1 for now: for more, serve it with "
        "`splitvl language --tensor-parallel-size N` or `splitvl up`",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.config import ConfigError, dtype_from_name
    from models.loader import CheckpointError
    from splitvl.offline import generate

    if args.max_tokens < 1:
        print("splitvl generate: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.tensor_parallel_size != 1:
        print(
            f"splitvl generate: --tensor-parallel-size {args.tensor_parallel_size}: offline generation runs the "
            "model in this one process (1 rank); to split it over several, serve it with "
            f"`splitvl language --tensor-parallel-size {args.tensor_parallel_size}` (or `splitvl up` with "
            "gpus.language listing one GPU per rank)",
            file=sys.stderr,
        )
        return 2
    model = args.model
    if model is None:
        from splitvl.deploy.tiny import cache_dir, tiny_checkpoint

        model = tiny_checkpoint(cache_dir(args.cache_dir))
    try:
        result = generate(
            model,
            args.prompt,
            image_paths=args.image,
            max_tokens=args.max_tokens,
            device=args.device,
            dtype=dtype_from_name(args.dtype),
            disaggregated=args.disaggregated,
        )
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        print(f"splitvl generate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "prompt_ids": result.prompt_ids}))
    else:
        print(result.text)
    return 0
