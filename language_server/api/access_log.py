"""One log line per HTTP request, written when it has really ended: method, path, status,
duration, and how a generation ended when that is not what the status says (a stream whose
client disconnected answered 200 before it was cut). Probes (/health, /metrics) log at debug."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("splitvl.access")

_QUIET = {"/health", "/metrics"}


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: int | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            outcome = scope.get("state", {}).get("outcome")
            client = scope.get("client") or ("-", 0)
            level = logging.DEBUG if scope["path"] in _QUIET else logging.INFO
            logger.log(
                level,
                '%s:%s "%s %s" %s%s %.3fs',
                client[0],
                client[1],
                scope["method"],
                scope["path"],
                status if status is not None else "-",
                f" ({outcome})" if outcome else "",
                time.monotonic() - started,
            )
