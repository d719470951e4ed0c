"""Messages between the language service's HTTP process and its engine process.

Both processes belong to one service and trust each other, so this is a plain typed msgpack
protocol (no tensors, no pickle): each message is a dataclass, sent as a msgpack map with a
"type" key. Requests flow HTTP -> engine over one zmq PUSH/PULL pair; outputs flow back over
another. Images cross as their sources: a data URL's bytes, decoded once by the HTTP process
(msgpack binary, up to `max_image_url_bytes`), or an http(s) URL / local path as a string. The
engine's encoder client sends each, as it came, to an encode service, whose result goes straight
to the engine process.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

import msgpack

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values, checked on both sides


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # a per-request generator: the same seed gives the same tokens
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS, stop token or stop string before this many tokens
    logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's plus the top n
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, bias added to its logit)


@dataclass
class Constraint:
    """Structured output: what the generated text must match. The engine compiles it with
    xgrammar against the checkpoint's tokenizer and masks each step's logits with it."""

    kind: str  # "json_schema" | "json_object" | "regex" | "grammar" (EBNF) | "structural_tag" (its JSON)
    source: str = ""  # the JSON schema, regex, EBNF or structural tag JSON; empty for json_object


@dataclass
class ImageRef:
    """One image of a request, in prompt order."""

    source: bytes | str  # a data URL's decoded bytes, or "http(s)://..." / a local file path
    # transfer.content_key of the bytes (+ options) where the HTTP process has them; "" for a URL
    # or path: the encoder reports the key of the content it read with the result.
    key: str
    options: dict[str, int] = field(default_factory=dict)  # min_pixels / max_pixels overrides


@dataclass
class GenerateRequest:
    request_id: str
    # The prompt after the chat template, with ONE image_token_id placeholder per image; the
    # engine expands each to the image's N tokens once its encode result arrives.
    prompt_token_ids: list[int]
    sampling: SamplingParams
    images: list[ImageRef] = field(default_factory=list)
    constraint: Constraint | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class StatsRequest:
    """Ask the engine for an EngineStats snapshot (answered on the outputs channel)."""

    nonce: int


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """New tokens of one request since its last output; the last one has finished=True."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0  # after image expansion
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    encode_wait_s: float | None = None  # image requests, first output: arrival to last encode result
    error_code: str | None = None  # with finish_reason "error": e.g. "encoder_unavailable", "invalid_image"
    error_message: str | None = None  # safe to show the client
    error_status: int | None = None  # HTTP status the API should answer with (400, 413, 503, ...)


@dataclass
class EngineStats:
    nonce: int
    running: int = 0
    waiting: int = 0
    awaiting_encode: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0
    chunked_prefills: int = 0  # prefill steps that covered only part of a prompt
    encoder_bytes_received: int = 0
    encode_wait_s_total: float = 0.0  # summed over image requests that got all their results
    encode_waits: int = 0
    encoders_healthy: int = 0
    encoders_total: int = 0
    steps: int = 0
    failed_steps: int = 0  # model steps that raised (rerun in halves; only a request failing alone ends)


@dataclass
class EngineReady:
    """Sent once by the engine process when the model is loaded and it accepts requests."""

    num_kv_blocks: int
    block_size: int
    result_address: str  # where encode services push results for this engine
    max_model_len: int  # the longest sequence served: settings' limit, capped by the KV cache
    weights: str = ""  # what the weights are on the device: "bfloat16", "fp8 (... tensors, block 128x128) + bfloat16"


@dataclass
class EngineFatal:
    """Sent by the engine process before it exits on an error it cannot serve through."""

    message: str


Message = GenerateRequest | AbortRequest | StatsRequest | RequestOutput | EngineStats | EngineReady | EngineFatal
_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (GenerateRequest, AbortRequest, StatsRequest, RequestOutput, EngineStats, EngineReady, EngineFatal)
}


def pack(msg: Message) -> bytes:
    body = asdict(msg)
    body["type"] = type(msg).__name__
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> Message:
    body: dict[str, Any] = msgpack.unpackb(data, raw=False)
    cls = _TYPES[body.pop("type")]
    return _build(cls, body)


def _build(cls: type, body: dict[str, Any]) -> Any:
    """The dataclass `cls` from its msgpack map, nested values rebuilt from the annotations."""
    hints = _hints(cls)
    return cls(**{f.name: _value(hints[f.name], body[f.name]) for f in fields(cls) if f.name in body})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(hint: Any, value: Any) -> Any:
    """`value` as msgpack gave it back (maps, lists) turned into what `hint` names: dataclasses,
    lists and tuples of them, optional ones; scalars, bytes and str come back as they are."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    if origin is list:
        return [_value(args[0], v) for v in value]
    if origin is tuple:
        return tuple(_value(a, v) for a, v in zip(args, value))
    if origin in (Union, types.UnionType):
        classes = [a for a in args if dataclasses.is_dataclass(a) or typing.get_origin(a) in (list, tuple)]
        return _value(classes[0], value) if len(classes) == 1 else value
    return value
