"""`splitvl bench BENCHMARK`: throughput measurements, each beside a same-run baseline.

Each benchmark is one entry of BENCHMARKS: (help, add_arguments, handler). To add one (say
`bench model`), write the two functions and add the entry; handlers import torch and the
measuring package lazily, so `splitvl --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Callable


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU parts (cuda_ipc) even where GPUs exist")
    parser.add_argument("--sizes", default="16,256", help="payload sizes in MiB, comma separated (default: 16,256)")
    parser.add_argument("--trials", type=int, default=3, help="timed trials per number; the best is kept (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages per trial, for slow machines")


def run_transfer(args: argparse.Namespace) -> int:
    from transfer.bench import run

    return run(sizes=[int(s) for s in args.sizes.split(",")], trials=args.trials, quick=args.quick,
               cpu_only=args.cpu_only)


BENCHMARKS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "transfer": (
        "wire bandwidth of zmq, shm and cuda_ipc beside the raw link (socket, memcpy, GPU copy); "
        "checks cuda_ipc bit-exactness on 2 GPUs",
        add_transfer_arguments,
        run_transfer,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure throughput against same-run baselines",
                                   description=__doc__.split("\n\n")[0])
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (help_text, add_arguments, handler) in BENCHMARKS.items():
        sub = benchmarks.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(func=handler)
