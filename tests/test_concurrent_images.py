"""Many image requests at once, as users send them: images of mixed sizes, repeats, streams,
several image prefills in one engine step beside decodes, with chunked prefill and preemption
forced, with and without prefix caching. Every answer must equal the same request sent alone.

Sampling is seeded at temperature 2 (the flattest OpenAI allows) so that, as with real traffic on random weights, some
generations contain the image token id itself: decoded in a step with another request's image
prefill, such a token once made the step one vision row short and failed every request in it.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.services import EncodeService, LanguageService, data_url, png

MODEL = "tiny-vl"
CLIENTS = 24
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def encoder(vl_ckpt, tmp_path_factory):
    service = EncodeService(vl_ckpt, tmp_path_factory.mktemp("encoder"), "--workers", "2").wait_ready()
    yield service
    service.stop()


def jobs() -> list[dict]:
    """Text and image requests; images of six sizes, each sent by several requests (repeats hit the
    encoder's cache and the prefix cache), some with two images."""
    rng = random.Random(0)
    images = [data_url(png(32 + 16 * (i % 3), 32 + 24 * (i % 2), seed=i)) for i in range(6)]
    out = []
    for i in range(CLIENTS * 2):
        content: list[dict] = [{"type": "text", "text": f"Question {i}: " + "tell me more " * rng.randrange(1, 12)}]
        kind = i % 4
        if kind in (1, 2, 3):
            content.insert(0, {"type": "image_url", "image_url": {"url": images[rng.randrange(6)]}})
        if kind == 3:
            content.append({"type": "image_url", "image_url": {"url": images[rng.randrange(6)]}})
        out.append({"messages": [{"role": "user", "content": content}], "seed": 1000 + i, "stream": i % 2 == 1})
    return out


def ask(service: LanguageService, job: dict) -> list[int] | str:
    client = service.client(timeout=120)
    args = dict(
        model=MODEL,
        messages=job["messages"],
        max_tokens=MAX_TOKENS,
        temperature=2.0,
        seed=job["seed"],
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    if job["stream"]:
        chunks = client.chat.completions.create(stream=True, **args)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    args["extra_body"]["return_token_ids"] = True
    return client.chat.completions.create(**args).choices[0].model_extra["token_ids"]


def metric(service: LanguageService, name: str) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_concurrent_image_requests_equal_their_solo_runs(vl_ckpt, encoder, tmp_path, prefix_caching):
    language = LanguageService(
        tmp_path,
        vl_ckpt,
        "--served-model-name",
        MODEL,
        "--encoder",
        encoder.listen,
        # Small steps and a small cache: prompts are prefilled in chunks and requests are preempted.
        config={
            "chunk_size": 16,
            "max_num_batched_tokens": 96,
            "num_kv_blocks": 48,
            "block_size": 8,
            "max_num_seqs": 32,
            "enable_prefix_caching": prefix_caching,
        },
    )
    language.wait_healthy()
    try:
        work = jobs()
        alone = [ask(language, job) for job in work]
        preemptions = metric(language, "splitvl_preemptions_total")
        with ThreadPoolExecutor(CLIENTS) as pool:
            together = list(pool.map(lambda job: ask(language, job), work))
        mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
        assert not mismatched, f"requests {mismatched} differ from their solo runs"
        assert all(alone)
        # The case that broke: generated image token ids beside image prefills.
        image_token = _image_token_id(vl_ckpt)
        assert any(image_token in out if isinstance(out, list) else "<|image_pad|>" in out for out in alone)
        assert metric(language, "splitvl_preemptions_total") > preemptions
        assert metric(language, "splitvl_chunked_prefills_total") > 0
        assert metric(language, "splitvl_engine_failed_steps_total") == 0
        health = language.health()
        assert health["running"] == health["waiting"] == 0
    finally:
        assert language.stop() == 0


def _image_token_id(ckpt) -> int:
    from models.config import load_config

    return load_config(ckpt).image_token_id
