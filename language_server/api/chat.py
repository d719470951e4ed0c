"""Chat messages -> the prompt the engine runs: token ids with one image placeholder per image.

The checkpoint's own chat template renders the conversation (images become
`<|vision_start|><|image_pad|><|vision_end|>`), so prompts match what the model was trained on
and what transformers builds. The engine later expands each `<|image_pad|>` to the image's N
tokens once its encoder reports the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jinja2 import TemplateError

from language_server.api.errors import APIError, bad_request
from language_server.api.images import image_ref
from language_server.api.model_info import ServedModel
from language_server.api.schemas import ChatMessage
from language_server.protocol import ImageRef
from language_server.settings import LanguageSettings


@dataclass
class Prompt:
    token_ids: list[int]
    images: list[ImageRef] = field(default_factory=list)


def message_texts(messages: list[ChatMessage]) -> list[str]:
    """Every text of the conversation (for the size bound checked before rendering)."""
    texts = []
    for message in messages:
        if isinstance(message.content, str):
            texts.append(message.content)
        elif message.content is not None:
            texts.extend(part.text for part in message.content if part.type == "text")
    return texts


def chat_prompt(messages: list[ChatMessage], model: ServedModel, settings: LanguageSettings) -> Prompt:
    """Render and tokenize (CPU work: callers run it off the event loop)."""
    tokenizer = model.tokenizer
    if tokenizer.chat_template is None:
        raise bad_request("This model has no chat template; use /v1/completions with a plain prompt.",
                          code="no_chat_template")
    _check_image_count(messages, model, settings)
    rendered: list[dict] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        # OpenAI's "developer" role is its newer name for "system"; Qwen's template knows "system".
        role = "system" if message.role == "developer" else message.role
        if message.content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}].content is required for the {message.role} role.",
                                  param=f"messages[{i}].content")
            rendered.append({"role": role, "content": ""})
            continue
        if isinstance(message.content, str):
            rendered.append({"role": role, "content": message.content})
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
        rendered.append({"role": role, "content": parts})
    if images and not settings.encoders:
        raise APIError(503, "No encoder is configured for this service, so it cannot read images; "
                       "start it with --encoder ADDR (text-only requests work without one).",
                       code="encoder_unavailable")
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise bad_request(f"The chat template rejected these messages: {exc}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if model.image_token_id is not None and ids.count(model.image_token_id) != len(images):
        raise bad_request(f"Message text must not contain the image placeholder {model.image_token}; "
                          "send images as image_url content parts.", param="messages")
    return Prompt(ids, images)


def _check_image_count(messages: list[ChatMessage], model: ServedModel, settings: LanguageSettings) -> None:
    """Refuse image requests the model cannot take before reading any image."""
    count = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if not count:
        return
    if not model.is_vl:
        raise bad_request(f"The model '{model.name}' is text-only; it does not accept images.",
                          param="messages", code="images_not_supported")
    if count > settings.max_images_per_request:
        raise bad_request(f"This request has {count} images; the limit is {settings.max_images_per_request}.",
                          param="messages", code="too_many_images")
