"""POST /v1/completions: prompt(s) -> n generations each -> OpenAI's text completion response."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

from language_server.api.constraints import request_constraint
from language_server.api.detokenizer import TokenBytes
from language_server.api.errors import bad_request
from language_server.api.generation import Generation, Piece
from language_server.api.logprobs import CompletionLogprobs, merge_completion_logprobs
from language_server.api.sampling import check_choices, for_choice, refuse_unsupported, sampling_params, stop_strings
from language_server.api.schemas import CompletionRequest
from language_server.api.serving import respond
from language_server.api.state import AppState
from language_server.api.text_bound import refuse_oversized_text
from language_server.protocol import GenerateRequest


async def create_completion(
    req: CompletionRequest, request: Request, state: AppState, release: Callable[[], None]
) -> Response:
    state.check_model(req.model)
    refuse_unsupported(req)
    if req.suffix:
        raise bad_request("suffix is not supported.", param="suffix")
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise bad_request("best_of is supported only equal to n.", param="best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request(
            "echo with logprobs needs prompt logprobs, which this service does not compute.", param="echo"
        )
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    stops = stop_strings(req)
    texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
    refuse_oversized_text(texts, state.model, state.max_model_len, "prompt")
    # Before tokenizing: a batch of prompts is a list of strings or of token-id lists.
    batch = isinstance(req.prompt, list) and bool(req.prompt) and not isinstance(req.prompt[0], int)
    check_choices(len(req.prompt) if batch else 1, n)
    prompts = await state.offload(_prompt_ids, req.prompt, state)
    constraint = await state.offload(request_constraint, req)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    arrival = time.monotonic()
    generations, echoes = [], []
    for p, ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
        params = sampling_params(req, req.max_tokens, req.logprobs, len(ids), state.model, state.max_model_len, param)
        echo = state.model.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else ""
        for i in range(n):
            sampling = for_choice(params, i)
            generations.append(
                Generation(
                    state.client,
                    GenerateRequest(f"{request_id}-{p * n + i}", ids, sampling, constraint=constraint),
                    state.token_bytes,
                    stops,
                    req.skip_special_tokens is not False,
                    state.metrics,
                    arrival,
                )
            )
            echoes.append(echo)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    fmt = _CompletionFormat(request_id, state.model.name, echoes, state.token_bytes, req.logprobs, include_usage)
    return await respond(request, generations, n, fmt, bool(req.stream), include_usage, release)


def _prompt_ids(prompt: str | list[int] | list[str] | list[list[int]], state: AppState) -> list[list[int]]:
    """One or several prompts, as text or as token ids, each -> token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt must not be empty.", param="prompt")
    out = []
    for p, item in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
        ids = state.model.tokenizer(item, add_special_tokens=False)["input_ids"] if isinstance(item, str) else item
        if not ids:
            raise bad_request(f"{param} must not be empty.", param=param)
        bad = next((t for t in ids if not 0 <= t < state.model.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"{param} holds token id {bad}, outside the vocabulary [0, {state.model.vocab_size}).", param=param
            )
        if state.model.image_token_id in ids:
            raise bad_request(
                f"{param} holds the image placeholder token; images are accepted only through /v1/chat/completions.",
                param=param,
            )
        out.append(ids)
    return out


class _CompletionFormat:
    def __init__(
        self,
        request_id: str,
        model: str,
        echoes: list[str],
        token_bytes: TokenBytes,
        logprobs: int | None,
        include_usage: bool,
    ) -> None:
        self._head = {"id": request_id, "created": int(time.time()), "model": model}
        self._echoes = echoes  # per choice: the prompt text to put before its completion, or ""
        self._echo_sent = [False] * len(echoes)
        self._logprobs = (
            [CompletionLogprobs(token_bytes, logprobs, len(e)) for e in echoes] if logprobs is not None else None
        )
        self._include_usage = include_usage

    def _text(self, index: int, piece: Piece) -> str:
        if self._echo_sent[index]:
            return piece.text
        self._echo_sent[index] = True
        return self._echoes[index] + piece.text

    def _chunk_logprobs(self, index: int, piece: Piece) -> dict | None:
        return self._logprobs[index].chunk(piece.logprobs) if self._logprobs is not None else None

    def start_chunks(self) -> list[dict]:
        return []

    def chunks(self, index: int, piece: Piece) -> list[dict]:
        text = self._text(index, piece)
        if not text and not piece.logprobs and piece.finish_reason is None:
            return []
        chunk = {
            **self._head,
            "object": "text_completion",
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "logprobs": self._chunk_logprobs(index, piece),
                    "finish_reason": piece.finish_reason,
                }
            ],
        }
        if self._include_usage:
            chunk["usage"] = None
        return [chunk]

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head, "object": "text_completion", "choices": [], "usage": usage}

    def response(self, pieces: list[list[Piece]], usage: dict) -> dict:
        choices = []
        for index, parts in enumerate(pieces):
            logprobs = None
            if self._logprobs is not None:
                logprobs = merge_completion_logprobs([self._chunk_logprobs(index, p) for p in parts])
            choices.append(
                {
                    "index": index,
                    "text": "".join(self._text(index, p) for p in parts),
                    "logprobs": logprobs,
                    "finish_reason": parts[-1].finish_reason,
                }
            )
        return {**self._head, "object": "text_completion", "choices": choices, "usage": usage}
