"""One engine request as the API sees it: a stream of text pieces with stop strings applied.

The engine sends token ids; this turns them into text (incremental detokenization), cuts the
text at the first stop string (aborting the engine request so it frees its KV blocks at once),
counts tokens for `usage`, and records latency metrics. Every stream ends with exactly one
piece that carries a finish_reason; an engine error becomes an APIError with the engine's status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from language_server.api.detokenizer import IncrementalDetokenizer, TokenBytes
from language_server.api.engine_client import EngineClient, EngineUnavailable
from language_server.api.errors import APIError, engine_unavailable, unavailable
from language_server.api.metrics import Metrics
from language_server.api.stop import StopMatcher
from language_server.protocol import GenerateRequest, RequestOutput, TokenLogprob


@dataclass
class Piece:
    text: str
    token_ids: list[int] = field(default_factory=list)  # the tokens consumed for this piece
    logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, when requested
    finish_reason: str | None = None  # "stop" | "length" on the last piece


class Generation:
    def __init__(
        self,
        client: EngineClient,
        request: GenerateRequest,
        token_bytes: TokenBytes,
        stops: list[str],
        skip_special_tokens: bool,
        metrics: Metrics,
        arrival: float,
    ) -> None:
        self.request = request
        self._client = client
        self._detokenizer = IncrementalDetokenizer(token_bytes, skip_special_tokens)
        self._stop = StopMatcher(stops)
        self._metrics = metrics
        self._arrival = arrival
        self._last_token_time: float | None = None
        self.prompt_tokens = len(request.prompt_token_ids)  # until the engine reports the expanded count
        self.cached_tokens = 0
        self.completion_tokens = 0
        self._counted = False  # in the finished-requests metric

    async def pieces(self) -> AsyncIterator[Piece]:
        try:
            queue = self._client.add_request(self.request)
        except EngineUnavailable as exc:
            raise engine_unavailable(str(exc)) from None
        done = False  # the engine finished the request itself: nothing to abort
        try:
            while True:
                output = await queue.get()
                self._observe(output)
                if output.finish_reason == "error":
                    done = True
                    message = output.error_message or "The engine failed this request; see the service log."
                    code = output.error_code or "engine_error"
                    if output.error_status == 503:
                        raise unavailable(message, code)
                    raise APIError(output.error_status or 500, message, code=code)
                piece = self._decode(output)
                done = output.finished
                if self._stop.stopped:
                    piece.finish_reason = "stop"
                elif output.finished:
                    if output.finish_reason not in ("stop", "length"):
                        # "abort" here means the engine dropped the request on its own (shutting down).
                        raise engine_unavailable(f"the engine ended the request ({output.finish_reason})")
                    tail = self._stop.push(self._detokenizer.flush())
                    piece.text += tail if self._stop.stopped else tail + self._stop.flush()
                    piece.finish_reason = "stop" if self._stop.stopped else output.finish_reason
                if piece.finish_reason is not None:
                    self._finish(piece.finish_reason)
                    yield piece
                    return
                if piece.token_ids:
                    yield piece
        finally:
            if not done and not self._counted:  # the client left, or a sibling choice failed
                self._metrics.requests.labels(finish_reason="cancelled").inc()
            self._client.release(self.request.request_id, abort=not done)

    def _decode(self, output: RequestOutput) -> Piece:
        """Token by token, so a stop string ends the text (and the token count) exactly where it matched."""
        piece = Piece("")
        for i, token_id in enumerate(output.new_token_ids):
            self.completion_tokens += 1
            piece.token_ids.append(token_id)
            if output.logprobs is not None:
                piece.logprobs.append(output.logprobs[i])
            text = self._detokenizer.push(token_id)
            # Before min_tokens, stop strings do not apply (vLLM's rule): the text passes as is.
            piece.text += text if self.completion_tokens <= self.request.sampling.min_tokens else self._stop.push(text)
            if self._stop.stopped:
                break
        return piece

    def _observe(self, output: RequestOutput) -> None:
        self.prompt_tokens = max(self.prompt_tokens, output.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, output.cached_tokens)
        if output.encode_wait_s is not None:
            self._metrics.encode_wait.observe(output.encode_wait_s)
        if not output.new_token_ids:
            return
        now = time.monotonic()
        if self._last_token_time is None:
            images = "yes" if self.request.images else "no"
            self._metrics.ttft.labels(images=images).observe(now - self._arrival)
        else:
            gap = (now - self._last_token_time) / len(output.new_token_ids)
            for _ in output.new_token_ids:
                self._metrics.inter_token.observe(gap)
        self._last_token_time = now

    def _finish(self, reason: str) -> None:
        self._counted = True
        self._metrics.e2e.observe(time.monotonic() - self._arrival)
        self._metrics.requests.labels(finish_reason=reason).inc()
        self._metrics.prompt_tokens.inc(self.prompt_tokens)
        self._metrics.generation_tokens.inc(self.completion_tokens)
