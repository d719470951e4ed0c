"""`splitvl encode`: run the encode service (vision tower only) for language services."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="run the encode service: images in, vision embeddings out to the language side",
        description="Serve the vision tower of a Qwen3-VL checkpoint (only model.visual.* is read). "
        "Jobs arrive on --listen; each result goes to the job's reply address. Settings come from "
        "--config (YAML, keys as in encode_server/settings.py) with flags taking precedence. "
        "GET /health and /metrics on --http-port. SIGTERM finishes jobs in flight, then exits.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML settings file")
    p.add_argument("--model", metavar="DIR", help="checkpoint directory")
    p.add_argument("--listen", metavar="ADDR", help="address jobs arrive at, e.g. tcp://0.0.0.0:5600")
    p.add_argument("--transport", help="transfer backend jobs arrive by (default zmq)")
    p.add_argument("--result-transport", help="transfer backend results leave by: zmq (default) or cuda_ipc")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and output dtype (default auto: the checkpoint's)",
    )
    p.add_argument("--http-host", help="address of the health/metrics port (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="health/metrics port (default 8601; 0 picks one)")
    p.add_argument(
        "--workers", type=int, help="decode/preprocess threads (default 8; downloads have their own, fetch_workers)"
    )
    p.add_argument(
        "--batch-token-budget", type=int, metavar="PATCHES", help="most patches in one vision forward (default 16384)"
    )
    p.add_argument("--max-wait-ms", type=float, help="longest an image waits to be batched (default 5)")
    p.add_argument("--max-pending-jobs", type=int, help="jobs in flight before refusing as overloaded")
    p.add_argument("--cache-bytes", type=int, help="result cache budget in bytes (0 disables)")
    p.add_argument("--max-image-bytes", type=int, help="largest encoded image accepted")
    p.add_argument("--max-decoded-pixels", type=int, help="largest width*height decoded")
    p.add_argument("--max-pixels-limit", type=int, help="highest min/max_pixels a job may ask for")
    p.add_argument(
        "--url-allow",
        action="append",
        dest="url_allow_list",
        metavar="NETWORK",
        help="let URLs reach this private/loopback network (CIDR or address); repeatable",
    )
    p.add_argument(
        "--allow-local-root",
        action="append",
        dest="allowed_local_roots",
        metavar="DIR",
        help="let jobs name files under this directory; repeatable",
    )
    p.add_argument("--service-id", help="name reported in health pongs (default host:pid)")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="logging verbosity (default info)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encode_server.settings import SettingsError, load_settings

    overrides = {name: value for name, value in vars(args).items() if name not in ("config", "func", "command")}
    try:
        settings = load_settings(args.config, overrides)
    except SettingsError as exc:
        print(f"splitvl encode: {exc}", file=sys.stderr)
        return 2

    from encode_server.main import serve

    return serve(settings)
