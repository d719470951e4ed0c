"""The HTTP process's side of the engine link: send requests, route outputs to their requests.

One background task receives everything the engine sends and routes it: RequestOutputs to the
queue of their request, EngineStats to whoever asked, EngineReady / EngineFatal to the startup
wait. Sends go through a queue drained by another task, so `release` (abort) is a plain call
that works from `finally` blocks of cancelled tasks, where awaiting is no longer possible.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import zmq
import zmq.asyncio

from language_server.protocol import (
    AbortRequest,
    EngineFatal,
    EngineReady,
    EngineStats,
    GenerateRequest,
    Message,
    RequestOutput,
    StatsRequest,
    pack,
    unpack,
)

logger = logging.getLogger("splitvl.api")


class EngineUnavailable(Exception):
    """The engine is not running (never started, exited, or reported a fatal error)."""


class EngineClient:
    def __init__(self, request_address: str, output_address: str) -> None:
        self._context = zmq.asyncio.Context()
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.bind(output_address)  # bound before the engine starts, so nothing it sends is lost
        self._requests = self._context.socket(zmq.PUSH)
        self._requests.connect(request_address)
        self._pending: asyncio.Queue[Message] = asyncio.Queue()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stats_waiters: dict[int, asyncio.Future[EngineStats]] = {}
        self._nonces = itertools.count()
        self._ready: asyncio.Future[EngineReady] = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._send_loop())]
        self.dead_reason: str | None = None

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    async def wait_ready(self) -> EngineReady:
        """EngineReady, or EngineUnavailable with the engine's fatal message."""
        return await asyncio.shield(self._ready)

    def add_request(self, request: GenerateRequest) -> asyncio.Queue[RequestOutput]:
        if self.dead_reason is not None:
            raise EngineUnavailable(self.dead_reason)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._send(request)
        return queue

    def release(self, request_id: str, abort: bool) -> None:
        """The caller is done with this request; abort tells the engine to drop it and free its KV."""
        if self._queues.pop(request_id, None) is not None and abort and self.dead_reason is None:
            self._send(AbortRequest(request_id))

    async def stats(self, timeout: float) -> EngineStats:
        if self.dead_reason is not None:
            raise EngineUnavailable(self.dead_reason)
        nonce = next(self._nonces)
        waiter: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self._stats_waiters[nonce] = waiter
        self._send(StatsRequest(nonce))
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"the engine did not answer a stats query within {timeout:g} s") from None
        finally:
            self._stats_waiters.pop(nonce, None)

    def mark_dead(self, reason: str) -> None:
        """Fail everything waiting on the engine; later calls raise EngineUnavailable."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if not self._ready.done():
            self._ready.set_exception(EngineUnavailable(reason))
        self.fail_all(503, "engine_unavailable", f"The engine stopped: {reason}.")
        for waiter in self._stats_waiters.values():
            if not waiter.done():
                waiter.set_exception(EngineUnavailable(reason))

    def fail_all(self, status: int, code: str, message: str) -> None:
        """End every request waiting on the engine with this error (each request's own cleanup
        then aborts its engine work)."""
        for request_id, queue in self._queues.items():
            queue.put_nowait(
                RequestOutput(
                    request_id,
                    [],
                    finished=True,
                    finish_reason="error",
                    error_code=code,
                    error_status=status,
                    error_message=message,
                )
            )
            if self.dead_reason is None:
                self._send(AbortRequest(request_id))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._outputs.close(linger=0)
        self._requests.close(linger=0)
        self._context.term()

    def _send(self, message: Message) -> None:
        self._pending.put_nowait(message)

    async def _send_loop(self) -> None:
        # One loop sends everything, so a request always reaches the engine before its abort.
        # Image bytes (up to max_image_url_bytes each) are packed on a worker thread and sent
        # without another copy, so a large request does not stall the other streams.
        while True:
            message = await self._pending.get()
            if isinstance(message, GenerateRequest) and any(isinstance(im.source, bytes) for im in message.images):
                await self._requests.send(await asyncio.to_thread(pack, message), copy=False)
            else:
                await self._requests.send(pack(message))

    async def _receive_loop(self) -> None:
        while True:
            data = await self._outputs.recv()
            try:
                message = unpack(data)
            except Exception as exc:  # a malformed message must not stop the routing of all others
                logger.error("dropped an engine message this process cannot read: %r", exc)
                continue
            self._route(message)

    def _route(self, message: Message) -> None:
        if isinstance(message, RequestOutput):
            queue = self._queues.get(message.request_id)
            if queue is not None:  # else released already (client gone, stop string hit)
                queue.put_nowait(message)
        elif isinstance(message, EngineStats):
            waiter = self._stats_waiters.get(message.nonce)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif isinstance(message, EngineReady):
            if not self._ready.done():
                self._ready.set_result(message)
        elif isinstance(message, EngineFatal):
            logger.error("engine fatal error: %s", message.message)
            self.mark_dead(message.message)
        else:
            logger.error("dropped an unexpected %s from the engine", type(message).__name__)
