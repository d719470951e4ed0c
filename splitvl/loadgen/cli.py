"""`splitvl bench serve`: the sweep over concurrencies or request rates, the table and the result file."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import sys
from pathlib import Path

import httpx

from splitvl.loadgen import dataset, report
from splitvl.loadgen.client import request_body
from splitvl.loadgen.load import Pacing, Target, run


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except ValueError as exc:
        print(f"splitvl bench serve: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    slos = report.parse_goodput(args.goodput)
    points = _sweep(args)
    requests = _dataset(args)
    base = args.base_url.rstrip("/")
    model = args.model or _first_model(base, args.api_key)
    target = Target(
        url=base + args.endpoint,
        model=model,
        api_key=args.api_key,
        timeout_s=args.timeout,
        body=lambda r: request_body(model, r, ignore_eos=args.ignore_eos, temperature=args.temperature),
    )
    print(
        f"{len(requests)} requests ({sum(r.images > 0 for r in requests)} with images) to {target.url}, "
        f"model {model!r}",
        file=sys.stderr,
    )
    # One request first: a server that cannot answer at all is reported before any sweep.
    warm, _ = asyncio.run(run(target, requests[:1], Pacing(concurrency=1), progress=False))
    if not warm[0].ok:
        raise ValueError(f"the first request failed: {warm[0].error}")

    results = []
    for label, pacing in points:
        outcomes, duration = asyncio.run(run(target, requests, pacing, progress=not args.no_progress))
        groups = report.report(outcomes, duration, slos)
        print(report.format_table(label, groups, duration))
        results.append(
            {
                "label": label,
                "max_concurrency": pacing.concurrency,
                "request_rate": pacing.request_rate,
                "duration_s": duration,
                **groups,
            }
        )
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(_header(args, model, slos) | {"points": results}, indent=2))
    if args.plot:
        _plot(results, Path(args.plot))
    return 1 if any(point["all"]["failed"] for point in results) else 0


def _sweep(args: argparse.Namespace) -> list[tuple[str, Pacing]]:
    concurrencies = _numbers(args.max_concurrency, int, "max-concurrency")
    if args.request_rate is None:
        return [
            (f"concurrency {c}", Pacing(concurrency=c, duration_s=args.duration, seed=args.seed))
            for c in concurrencies or [1]
        ]
    if len(concurrencies) > 1:
        raise ValueError("with --request-rate, --max-concurrency is one cap, not a list")
    if args.burstiness <= 0:
        raise ValueError("burstiness must be above 0")
    cap = concurrencies[0] if concurrencies else None
    return [
        (
            f"rate {rate:g}/s" + (f", cap {cap}" if cap else ""),
            Pacing(
                concurrency=cap, request_rate=rate, burstiness=args.burstiness, duration_s=args.duration, seed=args.seed
            ),
        )
        for rate in _numbers(args.request_rate, float, "request-rate")
    ]


def _numbers(text: str | None, kind: type, name: str) -> list:
    if text is None:
        return []
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: give numbers separated by commas") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--{name} {text!r}: every value must be above 0")
    return values


def _dataset(args: argparse.Namespace) -> list[dataset.Request]:
    if args.duration is not None and args.duration <= 0:
        raise ValueError("duration must be above 0")
    if args.dataset_path:
        return dataset.jsonl_requests(Path(args.dataset_path), args.random_output_len)
    sizes = dataset.parse_sizes(args.image_size)
    if args.images_per_request and not sizes:
        raise ValueError("--images-per-request needs --image-size")
    return dataset.random_requests(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        range_ratio=args.random_range_ratio,
        image_sizes=sizes,
        images_per_request=args.images_per_request,
        image_fraction=args.image_fraction,
        stream_fraction=args.stream_fraction,
        seed=args.seed,
    )


def _first_model(base: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"cannot list the models at {base}/v1/models ({exc}); pass --model") from None


def _header(args: argparse.Namespace, model: str, slos: dict) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url,
        "model": model,
        "client_host": platform.node(),
        "arguments": {k: v for k, v in vars(args).items() if k not in ("api_key", "func")},
        "slos_ms": {k: v * 1000 for k, v in slos.items()},
    }


def _plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'splitvl[plot]'", file=sys.stderr)
        return
    load = [r["max_concurrency"] if r["request_rate"] is None else r["request_rate"] for r in results]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, metric in zip(axes, ("ttft_ms", "tpot_ms", "e2el_ms")):
        for stat in ("p50", "p99"):
            axis.plot(load, [(r["all"][metric] or {}).get(stat) for r in results], marker="o", label=stat)
        axis.set_title(metric.replace("_ms", "").upper() + " (ms)")
        axis.set_xlabel("request rate (/s)" if results[0]["request_rate"] is not None else "concurrency")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
