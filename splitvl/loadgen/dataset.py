"""The requests a run sends: random text of given lengths, random images of given sizes, or a
local JSONL file of chat requests."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Common English words that byte-level BPE vocabularies hold as one token each (with the
# leading space), so `input_len` words come out near `input_len` tokens. The report uses the
# server's own count (`usage.prompt_tokens`), not this estimate.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "are",
    "from",
    "or",
    "an",
    "have",
    "not",
    "but",
    "all",
    "they",
    "which",
    "one",
    "you",
    "were",
    "her",
    "can",
    "there",
    "we",
    "out",
    "if",
    "so",
    "up",
    "said",
    "what",
    "its",
    "about",
    "into",
    "than",
    "them",
    "some",
    "could",
    "time",
    "only",
    "new",
    "people",
    "two",
    "more",
    "first",
    "may",
    "way",
    "like",
    "over",
    "such",
    "our",
    "man",
]


@dataclass
class Request:
    """One chat completion to send: the body's messages and its output length."""

    messages: list[dict]
    max_tokens: int
    images: int = 0
    extra: dict = field(default_factory=dict)  # other body fields from a JSONL line
    stream: bool = True


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'448x448,1024x768' -> [(448, 448), (1024, 768)] as (width, height)."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        width, sep, height = item.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
            raise ValueError(f"image size {item!r}: write WIDTHxHEIGHT, e.g. 448x448")
        sizes.append((int(width), int(height)))
    return sizes


def random_image_url(width: int, height: int, rng: np.random.Generator) -> str:
    """A PNG of noise as a data URL: unique content, so no server cache answers it for free."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    *,
    range_ratio: float = 0.0,
    image_sizes: list[tuple[int, int]] = (),
    images_per_request: int = 0,
    image_fraction: float = 1.0,
    stream_fraction: float = 1.0,
    seed: int = 0,
) -> list[Request]:
    """`num` requests of about `input_len` text tokens and `output_len` output tokens (each drawn
    uniformly within ±range_ratio); a share `image_fraction` of them carry `images_per_request`
    images, each of a size drawn from `image_sizes`; a share `stream_fraction` are streamed."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num-prompts, random-input-len and random-output-len must be at least 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("random-range-ratio must be in [0, 1)")
    if not (0.0 <= image_fraction <= 1.0 and 0.0 <= stream_fraction <= 1.0):
        raise ValueError("image-fraction and stream-fraction must be in [0, 1]")
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    out = []
    for i in range(num):
        # A distinct opening per request, so prefix caching cannot serve one request from another.
        text = f"{i} " + " ".join(rng.choice(_WORDS) for _ in range(max(0, length(input_len) - 1)))
        content: list[dict] = [{"type": "text", "text": text}]
        images = images_per_request if image_sizes and rng.random() < image_fraction else 0
        for _ in range(images):
            width, height = rng.choice(list(image_sizes))
            content.insert(0, {"type": "image_url", "image_url": {"url": random_image_url(width, height, pixels)}})
        out.append(
            Request(
                [{"role": "user", "content": content}],
                length(output_len),
                images,
                stream=rng.random() < stream_fraction,
            )
        )
    return out


def jsonl_requests(path: Path, default_max_tokens: int) -> list[Request]:
    """One chat request body per line (at least `messages`); `max_tokens` (or
    `max_completion_tokens`) from the line, else `default_max_tokens`; streamed unless the line
    says `"stream": false`. Other fields are sent as they are, except `model`, which the run sets."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise ValueError(f"{path}:{number}: each line must be a chat request with a 'messages' list")
        messages = body.pop("messages")
        max_tokens = body.pop("max_tokens", None) or body.pop("max_completion_tokens", None) or default_max_tokens
        stream = body.pop("stream", True) is not False
        for key in ("model", "stream_options"):
            body.pop(key, None)
        images = sum(
            1
            for m in messages
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"
        )
        out.append(Request(messages, int(max_tokens), images, body, stream=stream))
    if not out:
        raise ValueError(f"{path} holds no requests")
    return out
