"""Image chat through the whole split: openai client -> `splitvl language` -> its engine ->
`splitvl encode` (a real encode service subprocess) -> engine -> client, on loopback. Greedy
tokens must equal transformers' `generate` fed by transformers' own image processor.

The encoder may fetch from 127.0.0.2 (an image host served from this process, standing for a
public one) and both services may read one temporary directory, so one image can be sent as a
data URL, a local file and an http URL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from transformers import AutoTokenizer

from language_server.api.detokenizer import TokenBytes
from tests.reference import hf_chat_greedy
from tests.services import EncodeService, LanguageService, data_url, png

MAX_TOKENS = 12
IMAGE_A = png(96, 64, seed=0)  # its data URL is ~24 KB: it crosses to the encoder as bytes
IMAGE_B = png(24, 56, seed=1)


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


class ImageHost(ThreadingHTTPServer):
    """Serves `images[path]`; a test may change what a path serves."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.2", 0), _ImageHandler)
        self.images: dict[str, bytes] = {}
        self.url = f"http://127.0.0.2:{self.server_address[1]}"


class _ImageHandler(BaseHTTPRequestHandler):
    server: ImageHost

    def do_GET(self) -> None:
        body = self.server.images.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("content-type", "image/png")
        self.send_header("content-length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield host
    host.shutdown()
    host.server_close()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def encode_service(vl_ckpt, image_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encode")
    config = tmp / "encode.yaml"
    config.write_text(yaml.safe_dump({"url_allow_list": ["127.0.0.2/32"], "allowed_local_roots": [str(image_root)]}))
    service = EncodeService(vl_ckpt, tmp, "--config", str(config)).wait_ready()
    yield service.listen
    service.stop()


@pytest.fixture(scope="module")
def image_service(vl_ckpt, encode_service, image_root, tmp_path_factory):
    service = LanguageService(
        tmp_path_factory.mktemp("api_images"),
        vl_ckpt,
        "--encoder",
        encode_service,
        "--served-model-name",
        "tiny-vl",
        config={"allowed_local_image_roots": [str(image_root)]},
    )
    try:
        service.wait_healthy()
        service.wait_encoder()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def reference(vl_ckpt):
    """transformers' greedy tokens for a conversation, images through AutoImageProcessor (PIL)."""
    return hf_chat_greedy(vl_ckpt, MAX_TOKENS), TokenBytes(AutoTokenizer.from_pretrained(vl_ckpt))


def _chat(service: LanguageService, messages: list[dict], **kwargs):
    return service.client().chat.completions.create(
        model="tiny-vl", messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, **kwargs
    )


ONE_IMAGE = [{"role": "user", "content": [image_part(IMAGE_A), {"type": "text", "text": "What is shown here?"}]}]
MULTI_TURN = [
    {"role": "system", "content": "Describe images."},
    {"role": "user", "content": [image_part(IMAGE_A), {"type": "text", "text": "And this one?"}]},
    {"role": "assistant", "content": "A gradient."},
    {"role": "user", "content": [{"type": "text", "text": "Compare with:"}, image_part(IMAGE_B)]},
]


@pytest.mark.parametrize("messages", [ONE_IMAGE, MULTI_TURN], ids=["one_image", "multi_turn_two_images"])
def test_image_chat_greedy_equals_transformers(image_service, reference, messages):
    generate, token_bytes = reference
    want, prompt_len = generate(messages)
    response = _chat(image_service, messages)
    assert [c.bytes for c in response.choices[0].logprobs.content] == [list(token_bytes(t)) for t in want]
    assert response.usage.prompt_tokens == prompt_len  # after image expansion
    streamed = image_service.client().chat.completions.create(
        model="tiny-vl", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == response.choices[0].message.content


def test_repeated_image_is_served_from_the_prefix_cache(image_service):
    # The first 16-token block holds image tokens, so a hit there needs the same image key.
    messages = [{"role": "user", "content": [image_part(png(40, 28, seed=3)), {"type": "text", "text": "Again."}]}]
    first = _chat(image_service, messages)
    again = _chat(image_service, messages)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    metrics = httpx.get(f"{image_service.url}/metrics").text
    received = next(line for line in metrics.splitlines() if line.startswith("splitvl_encoder_bytes_received_total"))
    assert float(received.split()[-1]) > 0
    waits = next(line for line in metrics.splitlines() if line.startswith("splitvl_encode_wait_seconds_count"))
    assert float(waits.split()[-1]) >= 2  # both requests waited for (cached) encode results


def test_a_constraint_holds_for_an_image_request(image_service):
    # The grammar compile and the image encode are both awaited before the request is scheduled.
    choices = ["a cat", "a dog", "a gradient"]
    for seed in range(3):
        reply = image_service.client().chat.completions.create(
            model="tiny-vl",
            messages=[
                {
                    "role": "user",
                    "content": [image_part(png(32 + 8 * seed, 24, seed=seed)), {"type": "text", "text": "What is it?"}],
                }
            ],
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_choice": choices},
        )
        assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens > 20  # the image's tokens are in the prompt


def test_undecodable_image_is_a_client_error(image_service):
    not_an_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    messages = [{"role": "user", "content": [not_an_image, {"type": "text", "text": "?"}]}]
    response = httpx.post(
        f"{image_service.url}/v1/chat/completions",
        timeout=60,
        json={"model": "tiny-vl", "messages": messages, "max_tokens": 2},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert image_service.health()["status"] == "ok"


def test_bad_base64_is_an_openai_400_and_the_service_keeps_serving(image_service):
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64!"}}
    with pytest.raises(openai.BadRequestError) as info:
        _chat(image_service, [{"role": "user", "content": [{"type": "text", "text": "?"}, bad]}])
    error = info.value.body
    assert (error["code"], error["param"]) == ("invalid_image_url", "messages[0].content[1].image_url")
    assert "not valid base64" in error["message"] and error["type"] == "invalid_request_error"
    reply = _chat(image_service, [{"role": "user", "content": [image_part(IMAGE_B), {"type": "text", "text": "?"}]}])
    assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 20


def _full_blocks(prompt_tokens: int, block: int = 16) -> int:
    """Prompt tokens a repeated prompt finds cached: its full blocks, less the last token's."""
    return (prompt_tokens - 1) // block * block


def test_one_image_as_data_url_file_and_url_has_one_content_key(image_service, image_host, image_root):
    """The HTTP process keys the data URL's bytes; the encoder keys what it read from the file and
    the URL and reports it: one key, so the file and the URL reuse the data URL's KV blocks."""
    data = png(80, 48, seed=21)
    (image_root / "same.png").write_bytes(data)
    image_host.images["/same.png"] = data
    # More than a block of text after the image, so the cached full blocks cover all its tokens.
    text = {"type": "text", "text": "Is this the very same picture as the one before, and what makes you think so?"}
    replies = []
    for url in (data_url(data), str(image_root / "same.png"), f"{image_host.url}/same.png"):
        part = {"type": "image_url", "image_url": {"url": url}}
        replies.append(_chat(image_service, [{"role": "user", "content": [part, text]}]))
    first, from_file, from_url = replies
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    for reply in (from_file, from_url):
        assert reply.usage.prompt_tokens == first.usage.prompt_tokens
        assert reply.usage.prompt_tokens_details.cached_tokens == _full_blocks(first.usage.prompt_tokens)
        assert reply.choices[0].message.content == first.choices[0].message.content


def test_changed_content_at_one_url_is_answered_as_the_new_image(image_service, image_host, reference):
    generate, token_bytes = reference
    old, new = png(64, 64, seed=31), png(64, 64, seed=32)

    def messages(url: str) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Which one?"}],
            }
        ]

    want_old, _ = generate(messages(data_url(old)))
    want_new, _ = generate(messages(data_url(new)))
    assert want_old != want_new  # else a stale reuse could not show
    image_host.images["/changing.png"] = old
    before = _chat(image_service, messages(f"{image_host.url}/changing.png"))
    image_host.images["/changing.png"] = new
    after = _chat(image_service, messages(f"{image_host.url}/changing.png"))
    assert [c.bytes for c in before.choices[0].logprobs.content] == [list(token_bytes(t)) for t in want_old]
    assert [c.bytes for c in after.choices[0].logprobs.content] == [list(token_bytes(t)) for t in want_new]
    # The first block already holds image tokens: nothing of the old image's KV is reused.
    assert after.usage.prompt_tokens_details.cached_tokens == 0


def test_detail_low_caps_the_pixel_budget():
    from language_server.api.errors import APIError
    from language_server.api.images import LOW_DETAIL_MAX_PIXELS, image_options
    from language_server.api.schemas import ImageURL

    def options(**fields):
        return image_options(ImageURL(url="data:,", **fields), "image_url")

    assert options() == {} and options(detail="high") == {} and options(detail="auto") == {}
    assert options(detail="low") == {"max_pixels": LOW_DETAIL_MAX_PIXELS}
    assert options(detail="low", max_pixels=4096) == {"max_pixels": 4096}
    assert options(detail="high", max_pixels=10**7) == {"max_pixels": 10**7}
    with pytest.raises(APIError, match="with detail low"):
        options(detail="low", min_pixels=LOW_DETAIL_MAX_PIXELS + 1)
