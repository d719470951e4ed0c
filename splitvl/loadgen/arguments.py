"""The flags of `splitvl bench serve` (vLLM's `bench serve` names where one exists). Only argparse
here: every `splitvl` command registers its flags, and `splitvl --help` must stay fast."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument(
        "--endpoint", default="/v1/chat/completions", help="path of the chat endpoint (default: %(default)s)"
    )
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default $OPENAI_API_KEY)")
    p.add_argument(
        "--max-concurrency",
        default=None,
        help="clients in a closed loop; a comma list sweeps (default 1). With --request-rate: the cap "
        "on requests in flight",
    )
    p.add_argument(
        "--request-rate",
        default=None,
        help="open loop: arrivals per second (Poisson), 'inf' for all at once; a comma list sweeps",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 is Poisson, below 1 burstier (default 1)",
    )
    p.add_argument("--num-prompts", type=int, default=200, help="requests per sweep point (default %(default)s)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per sweep point instead: cycle the requests until then (a soak)",
    )
    p.add_argument(
        "--random-input-len", type=int, default=256, help="text tokens per request (about; default %(default)s)"
    )
    p.add_argument("--random-output-len", type=int, default=128, help="output tokens per request (default %(default)s)")
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths drawn uniformly within ±this share of the above (default 0)",
    )
    p.add_argument("--image-size", default="", help="WIDTHxHEIGHT of the random images; a comma list mixes sizes")
    p.add_argument("--images-per-request", type=int, default=0, help="images in each image request (default 0)")
    p.add_argument(
        "--image-fraction",
        type=float,
        default=1.0,
        help="share of requests that carry images (default 1: all, when --images-per-request > 0)",
    )
    p.add_argument(
        "--stream-fraction",
        type=float,
        default=1.0,
        help="share of requests sent streamed; the rest wait for the whole answer and count in "
        "latency and throughput but not in TTFT, TPOT and ITL (default 1)",
    )
    p.add_argument(
        "--dataset-path",
        default=None,
        help="a JSONL file of chat request bodies (one per line, with 'messages') instead of random text",
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (vLLM, SGLang, splitvl)"
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p.add_argument(
        "--goodput",
        nargs="+",
        metavar="NAME:MS",
        default=None,
        help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and the arrivals (default 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default %(default)s)")
    p.add_argument("--result-file", default=None, help="write every sweep point's figures here as JSON")
    p.add_argument("--plot", default=None, help="a PNG of latency against load (needs `pip install splitvl[plot]`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
