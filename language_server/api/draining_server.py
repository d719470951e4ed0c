"""uvicorn's server with a graceful drain on SIGTERM / SIGINT, as a load-balanced service needs.

On the first signal the service stops admitting (new generation requests get 503 with
Retry-After, /health answers 503 "draining" so load balancers route elsewhere), lets the
requests it is serving finish for up to shutdown_timeout_s, then ends whatever is still
running with a clean 503 (a JSON error body, or an SSE error event followed by [DONE]) and only
then lets uvicorn close the connections. A second Ctrl-C skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from language_server.api.errors import RETRY_AFTER_S
from language_server.api.state import AppState

logger = logging.getLogger("splitvl.language")

_POLL_S = 0.05
_FLUSH_S = 5.0  # for the ended requests' last bytes to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self._drain: asyncio.Task | None = None
        self._skip_wait = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # already past the drain: uvicorn's own handling (force exit on Ctrl-C)
            super().handle_exit(sig, frame)
        elif self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self.drain())
        elif sig == signal.SIGINT:
            self._skip_wait = True

    async def drain(self) -> None:
        state = self.state
        state.draining = True
        timeout = state.settings.shutdown_timeout_s
        logger.info("shutting down: no new requests; %d running may finish for up to %.0f s", state.in_flight, timeout)
        deadline = time.monotonic() + timeout
        while state.in_flight and time.monotonic() < deadline and not self._skip_wait:
            await asyncio.sleep(_POLL_S)
        if state.in_flight:
            logger.warning("ending %d requests still running after %.0f s with a 503", state.in_flight, timeout)
            state.client.fail_all(
                503,
                "server_shutting_down",
                f"The service shut down before this request finished; retry in {RETRY_AFTER_S} s.",
            )
            deadline = time.monotonic() + _FLUSH_S
            while state.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)
        self.should_exit = True
