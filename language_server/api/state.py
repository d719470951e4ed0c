"""What the routes share: settings, the served model, the engine link, metrics, admission, and
the worker threads that do a request's CPU work (parsing, chat template, tokenizing) off the
event loop, so /health and every stream keep going while one request's text is being read."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from language_server.api.detokenizer import TokenBytes
from language_server.api.engine_client import EngineClient
from language_server.api.errors import APIError, bad_request, shutting_down
from language_server.api.metrics import Metrics
from language_server.api.model_info import ServedModel
from language_server.settings import LanguageSettings

T = TypeVar("T")


@dataclass
class AppState:
    settings: LanguageSettings
    model: ServedModel
    token_bytes: TokenBytes
    client: EngineClient
    metrics: Metrics
    max_model_len: int  # settings' value, or less where the KV cache cannot hold that many tokens
    weights: str = ""  # the engine's report of its weights (FP8 kept, or the model dtype)
    in_flight: int = 0  # generation requests admitted and not yet finished
    draining: bool = False  # shutting down: no new requests, running ones finish
    workers: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.workers = ThreadPoolExecutor(self.settings.tokenizer_workers, thread_name_prefix="prompt")

    async def offload(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """fn(*args, **kwargs) on a worker thread. The tokenizer releases the GIL while it works;
        the template and JSON parsing hold it, but only for a fraction of a second per request."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(fn, *args, **kwargs))

    def check_model(self, name: str) -> None:
        if name != self.model.name:
            raise bad_request(
                f"The model '{name}' does not exist; this service serves '{self.model.name}'.",
                param="model",
                code="model_not_found",
            )

    def admit(self) -> Callable[[], None]:
        """Take a slot or answer 429 (or 503 while shutting down); returns the release, safe to
        call more than once."""
        if self.draining:
            raise shutting_down("The service is shutting down and takes no new requests")
        limit = self.settings.max_queued_requests
        if self.in_flight >= limit:
            raise APIError(
                429,
                f"The service is at its limit of {limit} requests in flight; retry shortly.",
                code="too_many_requests",
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()

        return release
