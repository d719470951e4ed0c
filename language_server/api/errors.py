"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

The official client picks its exception class from the status alone (400 BadRequestError, 401
AuthenticationError, 413/4xx APIStatusError, 429 RateLimitError, 5xx InternalServerError), and
shows `message`, so every message must tell the user what to change.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse

logger = logging.getLogger("splitvl.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "internal_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="request_too_large")


# Retry-After of every 503: about the time for a supervisor to restart a service, or for a load
# balancer to route elsewhere.
RETRY_AFTER_S = 5


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def engine_unavailable(detail: str = "the engine is not running") -> APIError:
    return unavailable(f"Service unavailable: {detail}; retry later.", "engine_unavailable")


def shutting_down(detail: str) -> APIError:
    return unavailable(f"{detail}; retry in a few seconds.", "server_shutting_down")


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    logger.exception("internal error serving %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "Internal server error; see the service log.", code="internal_error").response()
