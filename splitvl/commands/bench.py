"""`splitvl bench BENCHMARK`: throughput measurements, each beside a same-run baseline.

Each benchmark is one entry of BENCHMARKS: (help, add_arguments, handler). To add one (say
`bench model`), write the two functions and add the entry; handlers import torch and the
measuring package lazily, so `splitvl --help` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_transfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-only", action="store_true", help="zmq between host tensors only, even where GPUs exist")
    parser.add_argument("--sizes", default="16,256", help="payload sizes in MiB, comma separated (default: 16,256)")
    parser.add_argument(
        "--trials",
        type=int,
        default=3,
        help="timed trials per number, after a warm-up; the median is reported (default: 3)",
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages per trial, for slow machines")


def run_transfer(args: argparse.Namespace) -> int:
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "transfer_gpu.py").is_file():
        print(
            f"{root / 'benchmarks' / 'transfer_gpu.py'} not found: run `splitvl bench` from a source checkout "
            "(pip install -e .)"
        )
        return 2
    # Imported by its package name, not as a loose script: the sender processes it spawns import
    # their target function by that name.
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.transfer_gpu").run(args)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers to build (default: all 48; fewer fit smaller cards)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer generated tokens (~2-3 minutes on an H200)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on the CPU through the torch paths: checks the script end to end",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks the language model is split over, one GPU each (the CPU smoke: CPU ranks over gloo); "
        "transformers, one GPU's model, then runs only at 1",
    )
    parser.add_argument(
        "--expert-parallel", action="store_true", help="with --tensor-parallel-size: whole experts per rank"
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="also the FP8 checkpoint layout (weights FP8 on the GPU): decode B=1/16/64 and prefill 1k beside "
        "bf16, against the FP8 floor, with weight memory and KV capacity",
    )
    parser.add_argument("--out", default=None, help="JSON results path (default: $OUT/model_gpu.json)")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=510.0,
        help="sections that would start after this many seconds are skipped (default: 510)",
    )


def _checkout_script(name: str):
    """A measuring script of the checkout's benchmarks/ folder (not in the installed package), as a
    module; None (with a message) outside a source checkout."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        print(f"{path} not found: run `splitvl bench` from a source checkout (pip install -e .)")
        return None
    spec = importlib.util.spec_from_file_location(f"splitvl_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_model(args: argparse.Namespace) -> int:
    module = _checkout_script("model_gpu")
    return 2 if module is None else module.run(args)


def add_all_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the wiring, not a benchmark"
    )
    parser.add_argument("--out", default=None, help="folder for the JSON files (default $OUT or .)")
    parser.add_argument("--language-layers", type=int, default=48, help="layers of the language model in the TTFT part")
    parser.add_argument("--parts", default=None, help="comma list of parts: model,encode,ttft,load (default: all)")


def run_all(args: argparse.Namespace) -> int:
    module = _checkout_script("all_gpu")
    if module is None:
        return 2
    argv = (["--cpu-smoke"] if args.cpu_smoke else []) + (["--out", args.out] if args.out else [])
    argv += ["--parts", args.parts] if args.parts else []
    return module.main(argv + ["--language-layers", str(args.language_layers)])


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from splitvl.loadgen.arguments import add_arguments

    add_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    from splitvl.loadgen.cli import main

    return main(args)


BENCHMARKS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "transfer": (
        "wire throughput and latency of zmq and (on 2 GPUs) cuda_ipc per payload size, beside a same-run "
        "GPU-to-GPU copy",
        add_transfer_arguments,
        run_transfer,
    ),
    "model": (
        "the whole language model through the engine (CUDA graphs on and off) beside transformers on the same "
        "random weights: decode tok/s, prefill latency, share of the bandwidth floor",
        add_model_arguments,
        run_model,
    ),
    "serve": (
        "load an OpenAI-compatible server (this one, vLLM, SGLang) with concurrent chat requests, text and "
        "images: TTFT, TPOT, ITL, latency, throughput and goodput per concurrency or request rate",
        add_serve_arguments,
        run_serve,
    ),
    "all": (
        "every speed figure in one run: `bench model`, the vision tower and the encode service path against "
        "transformers, the time to first token of an image chat through both services (one GPU; two with "
        "cuda_ipc), and both services under load",
        add_all_arguments,
        run_all,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure throughput against same-run baselines", description=__doc__.split("\n\n")[0]
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (help_text, add_arguments, handler) in BENCHMARKS.items():
        sub = benchmarks.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(func=handler)
