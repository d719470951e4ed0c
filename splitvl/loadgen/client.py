"""Send one streamed chat completion and time it as the user sees it: when the first token
arrived, when each later piece arrived, and how many tokens the server says it produced."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from splitvl.loadgen.dataset import Request


@dataclass
class Outcome:
    """One request's timings (seconds, from the moment it was sent) or its error."""

    images: int
    streamed: bool
    started: float  # time.perf_counter() when it was sent
    ttft: float | None = None  # streamed requests only
    latency: float | None = None
    # Gaps between pieces of text after the first; a piece may hold more than one token.
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None for one-token answers)."""
        if not self.streamed or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def request_body(model: str, request: Request, *, ignore_eos: bool, temperature: float | None) -> dict:
    body = {
        **request.extra,
        "model": model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "stream": request.stream,
    }
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM, SGLang and splitvl take it; OpenAI itself does not
    if temperature is not None:
        body["temperature"] = temperature
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, images: int) -> Outcome:
    if not body.get("stream"):
        return await _send_whole(client, url, body, images)
    outcome = Outcome(images=images, streamed=True, started=time.perf_counter())
    last = outcome.started
    pieces = 0
    finished = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome.error = f"HTTP {response.status_code}: {_error_message(text)}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = f"stream error: {_error_message(data)}"
                    return outcome
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
                if chunk.get("usage"):
                    outcome.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
                    outcome.output_tokens = chunk["usage"].get("completion_tokens") or 0
                if not any(_has_text(choice) for choice in chunk.get("choices") or []):
                    continue
                now = time.perf_counter()
                if outcome.ttft is None:
                    outcome.ttft = now - outcome.started
                else:
                    outcome.itls.append(now - last)
                last = now
                pieces += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.latency = time.perf_counter() - outcome.started
    if not finished:
        outcome.error = "the stream ended without a finish_reason"
    elif outcome.ttft is None:
        outcome.ttft = outcome.latency  # an empty answer (say EOS first): all of it came at the end
    if not outcome.output_tokens:
        outcome.output_tokens = pieces  # a server that does not report usage: count pieces
    return outcome


async def _send_whole(client: httpx.AsyncClient, url: str, body: dict, images: int) -> Outcome:
    """A request answered in one response: only its latency and token counts."""
    outcome = Outcome(images=images, streamed=False, started=time.perf_counter())
    try:
        response = await client.post(url, json=body)
        if response.status_code != 200:
            outcome.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
            return outcome
        usage = response.json().get("usage") or {}
    except (httpx.HTTPError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.latency = time.perf_counter() - outcome.started
    outcome.prompt_tokens = usage.get("prompt_tokens") or 0
    outcome.output_tokens = usage.get("completion_tokens") or 0
    return outcome


def _has_text(choice: dict) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def _error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict):
            return f"{error.get('code') or error.get('type')}: {error.get('message')}"
    except (ValueError, AttributeError):
        pass
    return text[:200]
