"""`splitvl language`: the language service (OpenAI-compatible HTTP API + engine process)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from language_server.settings import LanguageSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "language",
        help="serve the language model behind an OpenAI-compatible API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. "
        "Images go to the encode services named by --encoder; without one, text-only requests "
        "still work. Flags override the values of --config.",
        epilog="examples:\n  splitvl language --model /models/Qwen3-VL-30B-A3B-Instruct "
        "--encoder tcp://10.0.0.5:7000 --port 8000\n"
        "  splitvl language --model /models/Qwen3-VL-30B-A3B-Instruct --device cuda:1 "
        "--tensor-parallel-size 2   # ranks on GPUs 1 and 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument(
        "--encoder",
        action="append",
        dest="encoders",
        metavar="ADDR",
        help="an encode service's job address, e.g. tcp://host:port; repeat for several",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the directory name)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        metavar="N",
        help="split the language model over N ranks, one process each: on --device cuda:K the GPUs "
        "K to K+N-1 (rank_devices in --config places them elsewhere), on cpu N CPU processes (default 1)",
    )
    p.add_argument(
        "--expert-parallel",
        action=argparse.BooleanOptionalAction,
        help="with several ranks: whole experts partitioned across them, instead of every expert "
        "split across them (default off)",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (see language_server/settings.py)")
    p.set_defaults(func=run)


def settings_of(args: argparse.Namespace) -> LanguageSettings:
    """The LanguageSettings of --config with every flag given over it."""
    from language_server.settings import LanguageSettings

    return LanguageSettings.load(
        args.config,
        model=args.model,
        encoders=args.encoders,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
        api_key=args.api_key,
        tensor_parallel_size=args.tensor_parallel_size,
        expert_parallel=args.expert_parallel,
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from language_server.launcher import ServiceError, serve
    from models.config import ConfigError

    try:
        settings = settings_of(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"splitvl language: invalid settings: {problems}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"splitvl language: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(settings)
    except (ServiceError, ConfigError, OSError, ValueError) as exc:
        print(f"splitvl language: {exc}", file=sys.stderr)
        return 1
