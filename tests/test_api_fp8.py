"""An FP8 checkpoint through the whole split: openai client -> `splitvl language` -> engine ->
`splitvl encode` -> engine -> client, on loopback. Greedy tokens must equal transformers'
`generate` on the dequantized weights (a plain fp32 copy), images through AutoImageProcessor."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from language_server.api.detokenizer import TokenBytes
from tests.reference import hf_model
from tests.services import EncodeService, LanguageService, data_url, png

MAX_TOKENS = 12
IMAGE = png(96, 64, seed=0)
QUESTION = "What is shown here?"


@pytest.fixture(scope="module")
def fp8_service(fp8_vl_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_fp8")
    encoder = EncodeService(fp8_vl_ckpt, tmp).wait_ready()
    service = LanguageService(tmp, fp8_vl_ckpt, "--encoder", encoder.listen, "--served-model-name", "tiny-fp8")
    try:
        service.wait_healthy()
        service.wait_encoder()
        yield service
    finally:
        service.stop()
        encoder.stop()


def reference_tokens(plain_ckpt) -> tuple[list[int], int]:
    tokenizer = AutoTokenizer.from_pretrained(plain_ckpt)
    processor = AutoImageProcessor.from_pretrained(plain_ckpt)
    model = hf_model(plain_ckpt)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(images=[Image.open(io.BytesIO(IMAGE)).convert("RGB")], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    text = text.replace("<|image_pad|>", "<|image_pad|>" * int(grid.prod() // 4))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            pixel_values=out["pixel_values"],
            image_grid_thw=out["image_grid_thw"],
            mm_token_type_ids=(ids == model.config.image_token_id).int(),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    return generated[0, ids.shape[1] :].tolist(), ids.shape[1]


def test_image_chat_on_an_fp8_checkpoint_equals_transformers_on_its_dequantized_weights(fp8_service, fp8_vl_plain):
    want, prompt_len = reference_tokens(fp8_vl_plain)
    response = fp8_service.client().chat.completions.create(
        model="tiny-fp8",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
    )
    token_bytes = TokenBytes(AutoTokenizer.from_pretrained(fp8_vl_plain))
    assert [c.bytes for c in response.choices[0].logprobs.content] == [list(token_bytes(t)) for t in want]
    assert response.usage.prompt_tokens == prompt_len
    assert len(set(want)) >= 3  # a varied answer, so equal tokens mean something
    assert "FP8 checkpoint: 112 weights dequantized" in fp8_service.log.read_text()


def test_models_endpoint_says_what_the_weights_are(fp8_service):
    """On a CPU an FP8 checkpoint is dequantized at load, and /v1/models says so (on a GPU it
    reads "fp8 (N tensors, block 128x128) + bfloat16")."""
    card = fp8_service.client().models.list().data[0]
    assert card.model_extra["weights"] == "float32"
