"""The FastAPI application: routes, API key, body limits, admission, health and metrics."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from language_server.api.access_log import AccessLog
from language_server.api.engine_client import EngineUnavailable
from language_server.api.errors import APIError, api_error_handler, internal_error_handler, too_large
from language_server.api.metrics import CONTENT_TYPE
from language_server.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from language_server.api.serve_chat import create_chat_completion
from language_server.api.serve_completions import create_completion
from language_server.api.state import AppState

_STATS_TIMEOUT_S = 5.0
_STARTED = int(time.time())
_TEXT_BODY_SLACK = 1 << 20  # messages and parameters around the images


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="splitvl language service", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = state
    app.add_exception_handler(APIError, _counted(api_error_handler, state))
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _counted(internal_error_handler, state))
    app.add_middleware(AccessLog)
    if state.settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_allow_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in state.settings.cors_allow_origins,
        )
    # Room for the allowed number of base64 images (4 characters per 3 bytes) plus the text.
    body_limit = _TEXT_BODY_SLACK + max(1, state.settings.max_images_per_request) * (
        state.settings.max_image_url_bytes * 4 // 3 + 64
    )

    def check_api_key(request: Request) -> None:
        expected = state.settings.api_key
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise APIError(
                401, "Invalid or missing API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, body_limit, state)
        release = state.admit()
        try:
            parsed = await state.offload(parse_body, body, ChatCompletionRequest)
            return await create_chat_completion(parsed, request, state, release)
        except BaseException:
            release()
            raise

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        body = await _read_body(request, body_limit, state)
        release = state.admit()
        try:
            parsed = await state.offload(parse_body, body, CompletionRequest)
            return await create_completion(parsed, request, state, release)
        except BaseException:
            release()
            raise

    def model_card() -> dict:
        return {
            "id": state.model.name,
            "object": "model",
            "created": _STARTED,
            "owned_by": "splitvl",
            "max_model_len": state.max_model_len,
            "weights": state.weights,
        }

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != state.model.name:
            raise APIError(
                404,
                f"The model '{model_id}' does not exist; this service serves '{state.model.name}'.",
                param="model",
                code="model_not_found",
            )
        return model_card()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:  # load balancers take the service out while it finishes its requests
            return JSONResponse({"status": "draining", "running_requests": state.in_flight}, status_code=503)
        try:
            stats = await state.client.stats(_STATS_TIMEOUT_S)
        except EngineUnavailable as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        # Text requests need no encoder, so a service whose encoders are all down still answers 200.
        degraded = stats.encoders_total > 0 and stats.encoders_healthy == 0
        return JSONResponse(
            {
                "status": "degraded" if degraded else "ok",
                "encoders_healthy": stats.encoders_healthy,
                "encoders_total": stats.encoders_total,
                "running": stats.running,
                "waiting": stats.waiting,
                "kv_blocks_free": stats.kv_blocks_free,
                "kv_blocks_total": stats.kv_blocks_total,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await state.client.stats(_STATS_TIMEOUT_S)
        except EngineUnavailable:
            stats = None  # the HTTP-side metrics are still worth scraping
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE)

    return app


async def _read_body(request: Request, limit: int, state: AppState) -> bytes:
    """The body, refusing one over `limit` bytes without reading it all (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"The request body is {declared} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"The request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
    state.metrics.bytes_received.inc(size)
    return b"".join(chunks)


def _counted(handler: Callable[[Request, Exception], Awaitable[JSONResponse]], state: AppState):
    async def counted(request: Request, exc: Exception) -> JSONResponse:
        response = await handler(request, exc)
        state.metrics.errors.labels(status=str(response.status_code)).inc()
        return response

    return counted


async def _http_exception_handler(_: Request, exc: Exception) -> JSONResponse:
    """Unknown routes and methods in OpenAI's error shape too."""
    assert isinstance(exc, StarletteHTTPException)
    return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()
