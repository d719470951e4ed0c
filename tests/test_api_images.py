"""Image chat through the whole split: openai client -> `splitvl language` -> its engine ->
`splitvl encode` (a real encode service subprocess) -> engine -> client, on loopback. Greedy
tokens must equal transformers' `generate` fed by transformers' own image processor."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from language_server.api.detokenizer import TokenBytes
from tests.reference import hf_model
from tests.services import EncodeService, LanguageService, data_url, png

MAX_TOKENS = 12
IMAGE_A = png(96, 64, seed=0)  # its data URL is ~24 KB: it crosses to the encoder as bytes
IMAGE_B = png(24, 56, seed=1)


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


@pytest.fixture(scope="module")
def encode_service(vl_ckpt, tmp_path_factory):
    service = EncodeService(vl_ckpt, tmp_path_factory.mktemp("encode")).wait_ready()
    yield service.listen
    service.stop()


@pytest.fixture(scope="module")
def image_service(vl_ckpt, encode_service, tmp_path_factory):
    service = LanguageService(tmp_path_factory.mktemp("api_images"), vl_ckpt, "--encoder", encode_service,
                              "--served-model-name", "tiny-vl")
    try:
        service.wait_healthy()
        service.wait_encoder()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def reference(vl_ckpt):
    """transformers' greedy tokens for a conversation, images through AutoImageProcessor (PIL)."""
    tokenizer = AutoTokenizer.from_pretrained(vl_ckpt)
    processor = AutoImageProcessor.from_pretrained(vl_ckpt)
    model = hf_model(vl_ckpt)

    def generate(messages: list[dict]) -> tuple[list[int], int]:
        rendered, images = [], []
        for m in messages:
            if isinstance(m["content"], str):
                rendered.append(m)
                continue
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append(p)
                else:
                    images.append(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1]))))
                    parts.append({"type": "image"})
            rendered.append({"role": m["role"], "content": parts})
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
        out = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pieces = text.split("<|image_pad|>")
        grids = out["image_grid_thw"]
        text = pieces[0] + "".join("<|image_pad|>" * int(g.prod() // 4) + rest
                                   for g, rest in zip(grids, pieces[1:], strict=True))
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(input_ids=ids, pixel_values=out["pixel_values"], image_grid_thw=grids,
                                       mm_token_type_ids=(ids == model.config.image_token_id).int(),
                                       max_new_tokens=MAX_TOKENS, do_sample=False)
        return generated[0, ids.shape[1]:].tolist(), ids.shape[1]

    return generate, TokenBytes(tokenizer)


def _chat(service: LanguageService, messages: list[dict], **kwargs):
    return service.client().chat.completions.create(model="tiny-vl", messages=messages, max_tokens=MAX_TOKENS,
                                                    temperature=0, logprobs=True, **kwargs)


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
    streamed = image_service.client().chat.completions.create(model="tiny-vl", messages=messages,
                                                              max_tokens=MAX_TOKENS, temperature=0, stream=True)
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
            model="tiny-vl", messages=[{"role": "user", "content": [image_part(png(32 + 8 * seed, 24, seed=seed)),
                                                                     {"type": "text", "text": "What is it?"}]}],
            max_tokens=16, temperature=1.0, seed=seed, extra_body={"guided_choice": choices})
        assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens > 20  # the image's tokens are in the prompt


def test_undecodable_image_is_a_client_error(image_service):
    not_an_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    messages = [{"role": "user", "content": [not_an_image, {"type": "text", "text": "?"}]}]
    response = httpx.post(f"{image_service.url}/v1/chat/completions", timeout=60,
                          json={"model": "tiny-vl", "messages": messages, "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert image_service.health()["status"] == "ok"



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
