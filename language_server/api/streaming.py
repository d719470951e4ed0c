"""Running a request's n generations together, SSE framing, and noticing a client that left.

A client that disconnects must free its engine work at once (KV blocks, batch slots), whether it
was streaming or waiting for a whole answer: each generation's `finally` aborts its engine
request, so cancelling the task that drives it is all a disconnect has to do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TypeVar

from fastapi import Request

from language_server.api.generation import Generation, Piece

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    pass


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def merge(generations: list[Generation]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) from all generations as they arrive. The first error ends the whole
    request; leaving early (error, disconnect, close) cancels the rest, which aborts them."""
    events: asyncio.Queue[tuple[int, Piece | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async with aclosing(generation.pieces()) as pieces:
                async for piece in pieces:
                    events.put_nowait((index, piece, None))
        except Exception as exc:
            events.put_nowait((index, None, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    remaining = len(generations)
    try:
        while remaining:
            index, piece, error = await events.get()
            if error is not None:
                raise error
            assert piece is not None
            if piece.finish_reason is not None:
                remaining -= 1
            yield index, piece
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task in done:
            return work_task.result()
        raise ClientDisconnected()
    finally:
        work_task.cancel()
        watch_task.cancel()
        # Wait until both have really stopped: a generator still running inside the cancelled
        # work cannot be closed by the caller ("aclose(): asynchronous generator is already running").
        await asyncio.wait({work_task, watch_task})


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
