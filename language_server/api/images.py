"""An `image_url` content part -> the ImageRef the engine dispatches to an encode service.

The HTTP process never decodes pixels (the encode service does), but it checks what it cheaply
can so bad input fails fast with a 400/413 instead of a trip through the engine and an encoder:
data URL syntax, media type, base64, size, and that local paths lie under an allowed root.

A data URL is base64-decoded here, once (callers run this on a worker thread, off the event
loop); its bytes go on to the engine and the encoder as binary, with their content key
(transfer.content_key: the bytes + the preprocessing options), the image's identity in the
encoder's cache and the engine's prefix cache. A URL or a local path goes on as a string: only the
encoder reads its content, so the encoder computes its key and reports it with the result.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from language_server.api.errors import bad_request, too_large
from language_server.api.schemas import ImageURL
from language_server.protocol import ImageRef
from language_server.settings import LanguageSettings
from transfer.content_key import content_key

# URLs and paths cross to the encoder as strings, which the wire caps at this length.
MAX_SOURCE_CHARS = 8192


# OpenAI's `detail: "low"`: a small fixed budget. 65,536 pixels is a 256x256 image, 64 image
# tokens with Qwen3-VL's 32-pixel merged patches (OpenAI's low detail is 85 tokens). "high" and
# "auto" keep the checkpoint's own bounds, Qwen's default for every image.
LOW_DETAIL_MAX_PIXELS = 65_536


def image_options(image_url: ImageURL, param: str) -> dict[str, int]:
    """The image's preprocessing bounds for the encoder: min_pixels / max_pixels as given, with
    detail "low" capping max_pixels."""
    options = {
        k: v for k, v in (("min_pixels", image_url.min_pixels), ("max_pixels", image_url.max_pixels)) if v is not None
    }
    if image_url.detail == "low":
        options["max_pixels"] = min(options.get("max_pixels", LOW_DETAIL_MAX_PIXELS), LOW_DETAIL_MAX_PIXELS)
    if "min_pixels" in options and "max_pixels" in options and options["min_pixels"] > options["max_pixels"]:
        limit = "max_pixels" if image_url.detail != "low" else f"max_pixels ({LOW_DETAIL_MAX_PIXELS} with detail low)"
        raise bad_request(f"{param}.min_pixels must not exceed {limit}.", param=param)
    return options


def image_ref(image_url: ImageURL, settings: LanguageSettings, param: str) -> ImageRef:
    url = image_url.url
    options = image_options(image_url, param)
    if url.startswith("data:"):
        data = _data_url_bytes(url, settings.max_image_url_bytes, param)
        return ImageRef(source=data, key=content_key(data, options), options=options)
    if len(url) > MAX_SOURCE_CHARS:
        raise bad_request(
            f"{param} is longer than {MAX_SOURCE_CHARS} characters; only data URLs may be longer.",
            param=param,
            code="invalid_image_url",
        )
    if url.startswith(("http://", "https://")):
        return ImageRef(source=url, key="", options=options)
    path = _allowed_local_path(url, settings.allowed_local_image_roots, param)
    if path.stat().st_size > settings.max_image_url_bytes:
        raise too_large(f"The image at {param} is larger than {settings.max_image_url_bytes} bytes.", param=param)
    return ImageRef(source=str(path), key="", options=options)


def _data_url_bytes(url: str, limit: int, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request(
            f"{param} must be a base64 data URL: 'data:image/<format>;base64,<data>'.",
            param=param,
            code="invalid_image_url",
        )
    media_type = header.removeprefix("data:").removesuffix(";base64")
    if not media_type.lower().startswith("image/"):
        raise bad_request(
            f"{param} has media type {media_type[:64]!r}, not an image; send 'data:image/<format>;base64,<data>'.",
            param=param,
            code="invalid_image_url",
        )
    # Refuse an oversized payload before decoding it (base64 carries 3 bytes per 4 characters).
    if len(payload) // 4 * 3 > limit + 3:
        raise too_large(f"The image at {param} is larger than {limit} bytes.", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64.", param=param, code="invalid_image_url") from None
    if not data:
        raise bad_request(f"{param} holds no image data.", param=param, code="invalid_image_url")
    if len(data) > limit:
        raise too_large(f"The image at {param} is larger than {limit} bytes.", param=param)
    return data


def _allowed_local_path(url: str, roots: list[str], param: str) -> Path:
    raw = url.removeprefix("file://")
    if not Path(raw).is_absolute():
        raise bad_request(
            f"{param} must be a data URL, an http(s) URL, or an absolute local path.",
            param=param,
            code="invalid_image_url",
        )
    path = Path(raw).resolve()  # resolves '..' and symlinks before the root check
    if not any(path.is_relative_to(Path(root).resolve()) for root in roots):
        raise bad_request(
            f"{param}: local image paths are not allowed here; the service accepts them only "
            "under its allowed_local_image_roots setting.",
            param=param,
            code="invalid_image_url",
        )
    if not path.is_file():
        raise bad_request(f"{param}: no image file at {url}.", param=param, code="invalid_image_url")
    return path
