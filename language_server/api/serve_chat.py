"""POST /v1/chat/completions: messages -> n generations -> OpenAI's chat response or chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response

from language_server.api.chat import chat_prompt, message_texts
from language_server.api.chat_output import ChoiceOutput
from language_server.api.constraints import check_tools, request_constraint
from language_server.api.detokenizer import TokenBytes
from language_server.api.errors import bad_request
from language_server.api.generation import Generation, Piece
from language_server.api.logprobs import chat_logprobs
from language_server.api.sampling import for_choice, refuse_unsupported, sampling_params, stop_strings
from language_server.api.schemas import ChatCompletionRequest
from language_server.api.serving import respond
from language_server.api.state import AppState
from language_server.api.text_bound import refuse_oversized_text
from language_server.protocol import GenerateRequest


async def create_chat_completion(
    req: ChatCompletionRequest, request: Request, state: AppState, release: Callable[[], None]
) -> Response:
    state.check_model(req.model)
    refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
    stops = stop_strings(req)
    check_tools(req)
    refuse_oversized_text(message_texts(req.messages), state.model, state.max_model_len, "messages")
    # tool_choice "none": the model cannot call tools, so they are not in its prompt either.
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    prompt = await state.offload(
        chat_prompt, req.messages, state.model, state.settings, tools, req.chat_template_kwargs
    )
    constraint = await state.offload(
        request_constraint, req, in_reasoning=prompt.in_reasoning, reasoning=state.model.reasoning
    )
    top_n = req.top_logprobs or 0
    params = sampling_params(
        req,
        req.max_completion_tokens or req.max_tokens,
        top_n if req.logprobs else None,
        len(prompt.token_ids),
        state.model,
        state.max_model_len,
        prompt_param="messages",
    )
    n = req.n or 1
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    arrival = time.monotonic()
    generations = [
        Generation(
            state.client,
            GenerateRequest(f"{request_id}-{i}", prompt.token_ids, for_choice(params, i), prompt.images, constraint),
            state.token_bytes,
            stops,
            req.skip_special_tokens is not False,
            state.metrics,
            arrival,
        )
        for i in range(n)
    ]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def output() -> ChoiceOutput:
        return ChoiceOutput(
            tools=tools is not None,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            reasoning=state.model.reasoning,
            in_reasoning=prompt.in_reasoning,
        )

    fmt = _ChatFormat(
        request_id,
        state.model.name,
        n,
        state.token_bytes if req.logprobs else None,
        top_n,
        include_usage,
        bool(req.return_token_ids),
        output,
    )
    return await respond(request, generations, n, fmt, bool(req.stream), include_usage, release)


class _ChatFormat:
    def __init__(
        self,
        request_id: str,
        model: str,
        n: int,
        token_bytes: TokenBytes | None,
        top_n: int,
        include_usage: bool,
        return_token_ids: bool,
        output: Callable[[], ChoiceOutput],
    ) -> None:
        self._return_token_ids = return_token_ids
        self._head = {"id": request_id, "created": int(time.time()), "model": model}
        self._n = n
        self._token_bytes = token_bytes  # None: logprobs not requested
        self._top_n = top_n
        self._include_usage = include_usage
        self._output = output
        self._streams = [output() for _ in range(n)]  # each choice's parsers, while streaming

    def _logprobs(self, entries: list) -> dict | None:
        if self._token_bytes is None:
            return None
        return {"content": chat_logprobs(entries, self._token_bytes, self._top_n), "refusal": None}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self._head, "object": "chat.completion.chunk", "choices": choices}
        if self._include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk but the last carries a null usage
        return chunk

    def start_chunks(self) -> list[dict]:
        return [
            self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(self._n)
        ]

    def chunks(self, index: int, piece: Piece) -> list[dict]:
        """One chunk per delta (content, reasoning, a tool call's fragments); a piece's logprobs
        ride on its first chunk, or on an empty delta while the parsers hold its text back."""
        out = self._streams[index]
        deltas = out.feed(piece.text) if piece.text else []
        if piece.finish_reason is not None:
            deltas += out.finish()
        if not deltas and (piece.logprobs or piece.finish_reason is not None):
            deltas = [{}]
        chunks = []
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            finish = _finish_reason(piece.finish_reason, out) if last else None
            logprobs = self._logprobs(piece.logprobs) if i == 0 and piece.logprobs else None
            chunks.append(
                self._chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
            )
        return chunks

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head, "object": "chat.completion.chunk", "choices": [], "usage": usage}

    def response(self, pieces: list[list[Piece]], usage: dict) -> dict:
        choices = []
        for index, parts in enumerate(pieces):
            logprobs = None
            if self._token_bytes is not None:
                logprobs = self._logprobs([e for p in parts for e in p.logprobs])
            out = self._output()
            out.feed("".join(p.text for p in parts))
            out.finish()
            choice = {
                "index": index,
                "message": out.message(),
                "logprobs": logprobs,
                "finish_reason": _finish_reason(parts[-1].finish_reason, out),
            }
            if self._return_token_ids:
                choice["token_ids"] = [t for p in parts for t in p.token_ids]
            choices.append(choice)
        return {**self._head, "object": "chat.completion", "choices": choices, "usage": usage}


def _finish_reason(reason: str | None, out: ChoiceOutput) -> str | None:
    """ "tool_calls" when the answer called a tool and ended on its own (a cut one stays "length")."""
    return "tool_calls" if reason == "stop" and out.called else reason
