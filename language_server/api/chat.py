"""Chat messages -> the prompt the engine runs: token ids with one image placeholder per image.

The checkpoint's own chat template renders the conversation (images become
`<|vision_start|><|image_pad|><|vision_end|>`), so prompts match what the model was trained on
and what transformers builds. The engine later expands each `<|image_pad|>` to the image's N
tokens once its encoder reports the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from language_server.api.errors import APIError, bad_request
from language_server.api.images import image_ref
from language_server.api.model_info import ServedModel
from language_server.api.reasoning_parser import prompt_ends_in_reasoning
from language_server.api.schemas import ChatMessage
from language_server.protocol import ImageRef
from language_server.settings import LanguageSettings


@dataclass
class Prompt:
    token_ids: list[int]
    images: list[ImageRef] = field(default_factory=list)
    # The generation prompt opened a think block the answer continues (Qwen3-VL-Thinking's does).
    in_reasoning: bool = False


# Template variables the handler sets itself; chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_KWARGS = {
    "messages",
    "conversation",
    "tools",
    "documents",
    "add_generation_prompt",
    "tokenize",
    "continue_final_message",
    "return_dict",
    "chat_template",
}


def message_texts(messages: list[ChatMessage]) -> list[str]:
    """Every text of the conversation (for the size bound checked before rendering)."""
    texts = []
    for message in messages:
        if isinstance(message.content, str):
            texts.append(message.content)
        elif message.content is not None:
            texts.extend(part.text for part in message.content if part.type == "text")
    return texts


def chat_prompt(
    messages: list[ChatMessage],
    model: ServedModel,
    settings: LanguageSettings,
    tools: list[dict] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> Prompt:
    """Render and tokenize (CPU work: callers run it off the event loop). `tools` go to the
    template as OpenAI sends them; `template_kwargs` are extra template variables (enable_thinking)."""
    for name in template_kwargs or {}:
        if name in _RESERVED_TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs may not set {name!r}; it comes from the request itself.",
                param=f"chat_template_kwargs.{name}",
            )
    tokenizer = model.tokenizer
    if tokenizer.chat_template is None:
        raise bad_request(
            "This model has no chat template; use /v1/completions with a plain prompt.", code="no_chat_template"
        )
    _check_image_count(messages, model, settings)
    rendered: list[dict] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        # OpenAI's "developer" role is its newer name for "system"; Qwen's template knows "system".
        role = "system" if message.role == "developer" else message.role
        entry = _message_fields(message, i)
        if message.content is None:
            if role != "assistant":
                raise bad_request(
                    f"messages[{i}].content is required for the {message.role} role.", param=f"messages[{i}].content"
                )
            rendered.append({"role": role, "content": "", **entry})
            continue
        if isinstance(message.content, str):
            rendered.append({"role": role, "content": message.content, **entry})
            continue
        parts: list[dict] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                param = f"messages[{i}].content[{j}].image_url"
                if role != "user":
                    raise bad_request(f"{param}: images are accepted only in user messages.", param=param)
                images.append(image_ref(part.image_url, settings, param))
                parts.append({"type": "image"})
        rendered.append({"role": role, "content": parts, **entry})
    if images and not settings.encoders:
        raise APIError(
            503,
            "No encoder is configured for this service, so it cannot read images; "
            "start it with --encoder ADDR (text-only requests work without one).",
            code="encoder_unavailable",
        )
    try:
        text = tokenizer.apply_chat_template(
            rendered, tools=tools, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        )
    except TemplateError as exc:
        raise bad_request(f"The chat template rejected these messages: {exc}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if model.image_token_id is not None and ids.count(model.image_token_id) != len(images):
        raise bad_request(
            f"Message text must not contain the image placeholder {model.image_token}; "
            "send images as image_url content parts.",
            param="messages",
        )
    return Prompt(ids, images, in_reasoning=model.reasoning and prompt_ends_in_reasoning(text))


def _message_fields(message: ChatMessage, i: int) -> dict[str, Any]:
    """Tool calls of an assistant turn and the call id of a tool turn, as chat templates read them."""
    if message.tool_calls is not None and message.role != "assistant":
        raise bad_request("Only assistant messages carry tool_calls.", param=f"messages[{i}].tool_calls")
    if message.role == "tool" and message.tool_call_id is None:
        raise bad_request("A tool message needs the tool_call_id it answers.", param=f"messages[{i}].tool_call_id")
    entry: dict[str, Any] = {}
    if message.tool_calls:
        # Arguments stay the JSON text the model wrote (templates print a string as it is), so an
        # earlier answer renders back to the same tokens and its prefix-cache blocks are reused.
        entry["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def _check_image_count(messages: list[ChatMessage], model: ServedModel, settings: LanguageSettings) -> None:
    """Refuse image requests the model cannot take before reading any image."""
    count = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if not count:
        return
    if not model.is_vl:
        raise bad_request(
            f"The model '{model.name}' is text-only; it does not accept images.",
            param="messages",
            code="images_not_supported",
        )
    if count > settings.max_images_per_request:
        raise bad_request(
            f"This request has {count} images; the limit is {settings.max_images_per_request}.",
            param="messages",
            code="too_many_images",
        )
