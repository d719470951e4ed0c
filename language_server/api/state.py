"""What the routes share: settings, the served model, the engine link, metrics and admission."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from language_server.api.detokenizer import TokenBytes
from language_server.api.engine_client import EngineClient
from language_server.api.errors import APIError, bad_request
from language_server.api.metrics import Metrics
from language_server.api.model_info import ServedModel
from language_server.settings import LanguageSettings


@dataclass
class AppState:
    settings: LanguageSettings
    model: ServedModel
    token_bytes: TokenBytes
    client: EngineClient
    metrics: Metrics
    max_model_len: int  # settings' value, or less where the KV cache cannot hold that many tokens
    in_flight: int = 0  # generation requests admitted and not yet finished

    def check_model(self, name: str) -> None:
        if name != self.model.name:
            raise bad_request(f"The model '{name}' does not exist; this service serves '{self.model.name}'.",
                              param="model", code="model_not_found")

    def admit(self) -> Callable[[], None]:
        """Take a slot or answer 429; returns the release, safe to call more than once."""
        limit = self.settings.max_queued_requests
        if self.in_flight >= limit:
            raise APIError(429, f"The service is at its limit of {limit} requests in flight; retry shortly.",
                           code="too_many_requests")
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
