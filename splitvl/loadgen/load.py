"""Pace requests: a closed loop (a fixed number of clients, each sending its next request when the
last one ends) or an open loop (arrivals at a rate, as independent users make them)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from splitvl.loadgen.client import Outcome, send
from splitvl.loadgen.dataset import Request


@dataclass
class Target:
    url: str  # the chat completions endpoint
    model: str
    api_key: str | None
    timeout_s: float
    body: Callable[[Request], dict]  # the request body for one dataset entry


@dataclass
class Pacing:
    """Closed loop at `concurrency`, or open loop at `request_rate` per second (Poisson arrivals,
    or gamma with `burstiness` < 1 burstier and > 1 steadier) capped at `concurrency` in flight
    if given. `duration_s` cycles through the requests until that much time has passed."""

    concurrency: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0
    duration_s: float | None = None
    seed: int = 0


async def run(
    target: Target, requests: list[Request], pacing: Pacing, *, progress: bool = True
) -> tuple[list[Outcome], float]:
    """Every outcome, and the wall time from the first send to the last answer."""
    limit = pacing.concurrency or 1024
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8)
    timeout = httpx.Timeout(target.timeout_s, connect=30.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        bar = tqdm(
            total=None if pacing.duration_s else len(requests),
            disable=not progress,
            unit="req",
            leave=False,
            dynamic_ncols=True,
        )
        outcomes: list[Outcome] = []

        async def one(request: Request) -> None:
            outcome = await send(client, target.url, target.body(request), request.images)
            outcomes.append(outcome)
            bar.update(1)
            if not outcome.ok:
                bar.set_postfix(errors=sum(not o.ok for o in outcomes), refresh=False)

        start = time.perf_counter()
        stop_at = start + pacing.duration_s if pacing.duration_s else None
        source = _requests(requests, stop_at)
        if pacing.request_rate is None:
            await asyncio.gather(*(_client_loop(source, one) for _ in range(pacing.concurrency or 1)))
        else:
            await _open_loop(source, one, pacing, asyncio.Semaphore(limit))
        bar.close()
        return outcomes, time.perf_counter() - start


def _requests(requests: list[Request], stop_at: float | None) -> Iterator[Request]:
    """The requests once, or cycled until `stop_at`."""
    if stop_at is None:
        yield from requests
        return
    for request in itertools.cycle(requests):
        if time.perf_counter() >= stop_at:
            return
        yield request


async def _client_loop(source: Iterator[Request], one: Callable) -> None:
    # One iterator shared by every client: asyncio runs one of them at a time, so each request
    # is taken once.
    for request in source:
        await one(request)


async def _open_loop(source: Iterator[Request], one: Callable, pacing: Pacing, slots: asyncio.Semaphore) -> None:
    rng = random.Random(pacing.seed)
    shape = pacing.burstiness
    scale = 1.0 / (pacing.request_rate * shape)
    tasks = []

    async def gated(request: Request) -> None:
        async with slots:
            await one(request)

    for request in source:
        tasks.append(asyncio.create_task(gated(request)))
        if pacing.request_rate != float("inf"):
            await asyncio.sleep(rng.gammavariate(shape, scale))
    await asyncio.gather(*tasks)
