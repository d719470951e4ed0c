"""Request bodies of the OpenAI endpoints we serve, validated by pydantic in strict mode.

Strict, because OpenAI rejects `"temperature": "0.5"` and so do we: a wrong type is a 400 that
names the parameter, never a silent coercion. Every field either works or is refused with a 400
naming it, so a client never gets an answer that quietly ignored what it asked for: unknown
fields are refused by pydantic (extra="forbid"), and fields OpenAI has that we do not serve are
declared here only so the handlers can refuse them with a reason (sampling.refuse_unsupported).
The one exception is a short list of bookkeeping hints that change nothing about the answer
(`user`, `metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier`); they are
accepted and documented as ignored. Responses are plain dicts built by the handlers in OpenAI's
documented shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from language_server.api.errors import bad_request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    # Qwen's preprocessing bounds for this image (override the encoder's defaults).
    min_pixels: int | None = Field(None, ge=1, le=2**53)
    max_pixels: int | None = Field(None, ge=1, le=2**53)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this result answers


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(_Body):
    type: Literal["text"]


class ResponseFormatJSONObject(_Body):
    type: Literal["json_object"]


class JSONSchemaSpec(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(_Body):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class SamplingFields(_Body):
    """What chat and text completions share. None means "not given": the handler picks defaults."""

    model: str
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # -1 or 0: off (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    min_tokens: int | None = Field(
        None, ge=0, le=2**31 - 1
    )  # vLLM's: no EOS, stop token or stop string before this many
    # Bookkeeping hints: accepted, change nothing (docs/api.md).
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OpenAI's: token id (as a string) -> a bias in [-100, 100] added to its logit.
    logit_bias: dict[str, float] | None = None
    # Structured outputs by vLLM's names, so clients written for vLLM work (docs/api.md).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    # OpenAI fields this service does not serve: declared so the handlers refuse them by name.
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: extra variables for the template
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extension: each choice also lists its generated token ids (non-streaming responses).
    return_token_ids: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def parse_body(body: bytes, cls: type[_Body]) -> Any:
    """Validate a JSON body; the most specific problem becomes a 400 naming its parameter."""
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "json_invalid":
            raise bad_request("The request body is not valid JSON.", code="invalid_json") from None
        # A union reports one error per member; the deepest location is the one the client meant.
        first = max(errors, key=lambda e: len(e["loc"]))
        param = _param_name(first["loc"])
        if not param:
            raise bad_request("The request body must be a JSON object.", code="invalid_json") from None
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif first["type"] == "extra_forbidden":
            raise bad_request(
                f"Unrecognized parameter: '{param}'. This service does not support it; remove it "
                "(docs/api.md lists what is served).",
                param=param,
                code="unsupported_parameter",
            ) from None
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        wrong_type = first["type"].endswith(("_type", "_parsing"))
        raise bad_request(message, param=param, code="invalid_type" if wrong_type else "invalid_value") from None


def _param_name(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 'list[...]', 0, 'image_url', 'image_url', 'url') ->
    'messages[0].content[0].image_url.url': drops union member names and the discriminator tag
    (which repeats the field name after it)."""
    out, previous, before = "", None, None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool") or (part == previous and before is not None):
            pass
        elif isinstance(previous, int) and isinstance(before, str) and "[" in before and part in _PART_TAGS:
            previous, before = None, part  # the discriminator tag of a content part (list[...], index, tag)
            continue
        else:
            out += f".{part}" if out else part
        previous, before = part, previous
    return out


_PART_TAGS = {"text", "image_url", "json_object", "json_schema"}
