"""`splitvl up`: the encode service and the language service on this host, one command."""

from __future__ import annotations

import argparse
import os
import sys

_SECRETS = ("api_key", "encoder_token", "job_token")

DESCRIPTION = """\
Start the encode service (vision tower) and the language service (OpenAI API + engine) as
separate processes on this host, wait until both are healthy, print the URL and a request to
try, and stop both on Ctrl-C. /health and /v1/* are served on --port.

With no model (no --model, no model: in --config) it serves a tiny random checkpoint, built
once into the cache directory, on the CPU: a demo of the whole path that needs no download.
With neither --config nor --model it runs the demo's own file, configs/tiny-cpu.yaml.

--config takes a deployment file (see configs/): top-level keys model, host, port, device,
dtype, gpus, transport, result_transport, startup_timeout_s, plus an `encode:` section (any
encode_server/settings.py field) and a `language:` section (any language_server/settings.py
field). Flags override the file; unknown keys are errors. `gpus.language` takes one GPU or a
list of them, one per tensor-parallel rank (language.tensor_parallel_size); --dry-run prints
each rank's device.

--only runs one of the two, for deployments across nodes: `--only encode` on the vision node
(needs encode.listen), `--only language` on the language node (needs language.encoders)."""

EPILOG = """\
examples:
  splitvl up                                              # tiny demo model on the CPU, port 8000
  splitvl up --model /models/Qwen3-VL-30B-A3B-Instruct --device cuda
  splitvl up --config configs/qwen3-vl-30b-a3b-2gpu.yaml --model /models/Qwen3-VL-30B-A3B-Instruct
  splitvl up --config configs/qwen3-vl-30b-a3b-multinode.yaml --only encode   # on the vision node
  splitvl up --dry-run --config configs/qwen3-vl-30b-a3b-1gpu.yaml            # print each service's settings
  splitvl up --config configs/qwen3-vl-30b-a3b-tp2.yaml   # encode on GPU 0, language over GPUs 1 and 2"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the encode and language services on this host until Ctrl-C",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the tiny demo checkpoint)")
    p.add_argument("--config", metavar="FILE", help="deployment YAML file, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--host", help="address /health and /v1 listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port of /health and /v1 (default 8000)")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], help="default cpu; the GPU of each service is gpus: in --config"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("SPLITVL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default $SPLITVL_API_KEY; none: open)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the demo checkpoint is built (default $SPLITVL_CACHE, else ~/.cache/splitvl)",
    )
    p.add_argument("--only", choices=["encode", "language"], help="run one of the two services (multi-node)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each service's resolved settings (secrets masked) and each language rank's "
        "device, and exit; builds nothing",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from splitvl.deploy.banner import banner, rank_lines
    from splitvl.deploy.config import DeployConfigError, load_deploy_config
    from splitvl.deploy.launcher import Launcher
    from splitvl.deploy.plan import make_plan
    from splitvl.deploy.tiny import (
        DEMO_CONFIG,
        TINY_MODEL_NAME,
        cache_dir,
        demo_image,
        tiny_checkpoint,
        tiny_checkpoint_path,
    )

    try:
        # Neither a file nor a model: the demo, with the settings of its file (configs/tiny-cpu.yaml).
        path = args.config if args.config or args.model else DEMO_CONFIG
        config = load_deploy_config(
            path,
            model=args.model,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            api_key=args.api_key,
        )
    except DeployConfigError as exc:
        print(f"splitvl up: {exc}", file=sys.stderr)
        return 2
    cache = cache_dir(args.cache_dir)
    if config.model is None:
        # A dry run only shows where the demo checkpoint would be; it writes nothing.
        model = tiny_checkpoint_path(cache) if args.dry_run else tiny_checkpoint(cache)
        default_name = TINY_MODEL_NAME
    else:
        model, default_name = config.model.expanduser().resolve(), None
        if not (model / "config.json").is_file():
            print(
                f"splitvl up: {model} has no config.json; --model takes a checkpoint directory as on the Hub "
                "(config.json, safetensors, tokenizer files)",
                file=sys.stderr,
            )
            return 2
    try:
        plan = make_plan(config, model, args.only, served_model_name=default_name)
    except DeployConfigError as exc:
        print(f"splitvl up: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        services = {
            name: _masked(settings.model_dump(mode="json"))
            for name, settings in (("encode", plan.encode), ("language", plan.language))
            if settings is not None
        }
        print(yaml.safe_dump(services, sort_keys=False), end="")
        if plan.language is not None:  # as YAML comments, so the output still loads as settings
            print("".join(f"# {line}\n" for line in rank_lines(plan.language)), end="")
        return 0
    name = (plan.language.served_model_name if plan.language else None) or model.name
    return Launcher(plan, config.startup_timeout_s).run(banner(plan, name, demo_image(cache)))


def _masked(settings: dict) -> dict:
    """Settings as printed by --dry-run: secrets shown only as set or not."""
    return {
        key: ("<set>" if value is not None else None) if key in _SECRETS else value for key, value in settings.items()
    }
