"""Driving a request's generations to a response: one JSON body, or an SSE stream of chunks.

Chat and text completions differ only in how a piece becomes a chunk and how the pieces become
the final body (a ResponseFormat); waiting, streaming, errors, usage and cleanup are shared.
For a stream, the first piece is awaited before any byte is sent, so errors the engine reports
up front (a bad image, no healthy encoder, a prompt too long once images are expanded) still get
their HTTP status; later errors arrive as an OpenAI error event, which the client raises.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from language_server.api.errors import APIError
from language_server.api.generation import Generation, Piece
from language_server.api.streaming import SSE_DONE, ClientDisconnected, merge, sse, until_disconnect

logger = logging.getLogger("splitvl.api")


class ResponseFormat(Protocol):
    def start_chunks(self) -> list[dict]: ...
    def chunks(self, index: int, piece: Piece) -> list[dict]: ...
    def usage_chunk(self, usage: dict) -> dict: ...
    def response(self, pieces: list[list[Piece]], usage: dict) -> dict: ...


def usage(generations: list[Generation], n: int) -> dict:
    """The prompt counts once per prompt, not once per choice (as OpenAI bills n > 1)."""
    firsts = generations[::n]
    prompt = sum(g.prompt_tokens for g in firsts)
    completion = sum(g.completion_tokens for g in generations)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in firsts)},
    }


async def respond(
    request: Request,
    generations: list[Generation],
    n: int,
    fmt: ResponseFormat,
    stream: bool,
    include_usage: bool,
    release: Callable[[], None],
) -> Response:
    """`release` runs exactly once, when the engine work of this request is over."""
    events = merge(generations)
    try:
        if not stream:
            pieces = await until_disconnect(request, _collect(events, len(generations)))
            release()
            return JSONResponse(fmt.response(pieces, usage(generations, n)))
        first = await until_disconnect(request, anext(events))
    except ClientDisconnected:
        release()
        request.state.outcome = "cancelled: the client disconnected"
        return Response(status_code=499)  # nobody reads it; uvicorn drops it
    except BaseException:
        await events.aclose()
        release()
        raise
    ended: dict = {"complete": False, "error": None}
    body = _stream_body(first, events, generations, n, fmt, include_usage, ended)

    async def cleanup() -> None:
        await body.aclose()
        await events.aclose()
        release()
        if not ended["complete"]:
            request.state.outcome = "cancelled: the client disconnected mid-stream"
        elif ended["error"]:
            request.state.outcome = ended["error"]

    return _EventStreamResponse(body, cleanup)


async def _collect(events: AsyncIterator[tuple[int, Piece]], count: int) -> list[list[Piece]]:
    pieces: list[list[Piece]] = [[] for _ in range(count)]
    async for index, piece in events:
        pieces[index].append(piece)
    return pieces


async def _stream_body(
    first: tuple[int, Piece],
    events: AsyncIterator[tuple[int, Piece]],
    generations: list[Generation],
    n: int,
    fmt: ResponseFormat,
    include_usage: bool,
    ended: dict,
) -> AsyncIterator[str]:
    """Every stream that is not cut by its client ends with [DONE], after an error event too (as
    vLLM does), so clients that read to [DONE] never hang."""
    try:
        for chunk in fmt.start_chunks():
            yield sse(chunk)
        index, piece = first
        while True:
            for chunk in fmt.chunks(index, piece):
                yield sse(chunk)
            try:
                index, piece = await anext(events)
            except StopAsyncIteration:
                break
        if include_usage:
            yield sse(fmt.usage_chunk(usage(generations, n)))
    except APIError as exc:
        ended["error"] = f"ended by an error event: {exc.status} {exc.code}"
        yield sse(exc.body())
    except Exception:
        logger.exception("internal error while streaming")
        ended["error"] = "ended by an error event: 500 internal_error"
        yield sse(APIError(500, "Internal server error; see the service log.", code="internal_error").body())
    yield SSE_DONE
    ended["complete"] = True


class _EventStreamResponse(StreamingResponse):
    """An SSE response whose cleanup runs however it ends: finished, client gone, or never
    started (a body generator that never ran has no `finally` to rely on)."""

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()
