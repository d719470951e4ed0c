"""The two services under load and under encoder faults, as real processes on loopback with the
official openai client: one language service configured with two encode services."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.services import EncodeService, LanguageService, data_url
from tests.services import png as png_bytes

ENCODE_TIMEOUT_S = 3.0
MAX_TOKENS = 8


def png(width: int, height: int, seed: int) -> str:
    return data_url(png_bytes(width, height, seed))


@pytest.fixture(scope="module")
def services(vl_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    encoders = [EncodeService(vl_ckpt, tmp), EncodeService(vl_ckpt, tmp)]
    for e in encoders:
        e.wait_ready()
    language = LanguageService(
        tmp,
        vl_ckpt,
        "--served-model-name",
        "tiny-vl",
        *[a for e in encoders for a in ("--encoder", e.listen)],
        config={
            "encode_timeout_s": ENCODE_TIMEOUT_S,
            "encoder_health_interval_s": 0.5,
            "encode_retries": 1,
            "chunk_size": 16,
            "max_num_batched_tokens": 64,
        },
    )
    language.wait_healthy()
    yield language, encoders, tmp
    language.stop()
    for e in encoders:
        if e.proc.poll() is None:
            e.kill()


def ask(service: LanguageService, content, stream: bool = False, max_tokens: int = MAX_TOKENS) -> list[int] | str:
    client = service.client(timeout=60)
    messages = [{"role": "user", "content": content}]
    if not stream:
        resp = client.chat.completions.create(
            model="tiny-vl",
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        return resp.choices[0].model_extra["token_ids"]
    # Streaming: the token ids come back through logprobs' bytes; compare the text instead.
    chunks = client.chat.completions.create(
        model="tiny-vl", messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def image_content(url: str, text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_32_concurrent_mixed_requests_equal_their_solo_runs(services):
    language, _, _ = services
    images = [png(32 + 8 * i, 48, seed=i) for i in range(4)]
    jobs = []
    for i in range(32):
        kind = i % 4
        if kind == 0:
            jobs.append(("text", f"Tell me about the number {i}.", False))
        elif kind == 1:
            jobs.append(("image", (images[i % 4], f"Image question {i}"), False))
        elif kind == 2:
            jobs.append(("text", "A much longer prompt that will be prefilled in several chunks " * 3 + str(i), True))
        else:
            jobs.append(("image", (images[(i // 4) % 4], "Describe."), True))

    def run(job):
        kind, payload, stream = job
        content = payload if kind == "text" else image_content(*payload)
        return ask(language, content, stream=stream)

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, jobs))
    assert together == alone
    assert all(out for out in alone)


def test_chunked_prefill_runs_while_another_request_decodes(services):
    language, _, _ = services
    before = _metric(language, "splitvl_chunked_prefills_total")
    long_prompt = "word " * 300  # several 16-token chunks
    with ThreadPoolExecutor(2) as pool:
        decoding = pool.submit(ask, language, "Count slowly.", False, 60)
        time.sleep(0.3)
        prefilling = pool.submit(ask, language, long_prompt, False, 2)
        assert prefilling.result() and decoding.result()
    assert _metric(language, "splitvl_chunked_prefills_total") - before >= 300 // 16 - 2


def _metric(service: LanguageService, name: str) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


def test_encoder_faults_fail_over_fail_clearly_and_recover(services, vl_ckpt):
    language, encoders, tmp = services
    first, second = encoders
    url = png(40, 40, seed=42)
    expected = ask(language, image_content(url, "What is it?"))

    # 1. The first encoder freezes and then dies with a job in flight: the request is retried on the
    #    second encoder and still gets the right answer, within about one encode timeout.
    first.proc.send_signal(signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        pending = pool.submit(ask, language, image_content(png(40, 40, seed=43), "Another one?"))
        time.sleep(0.5)
        first.kill()
        assert pending.result(timeout=ENCODE_TIMEOUT_S * 3)
        assert time.monotonic() - start < ENCODE_TIMEOUT_S * 3
    assert ask(language, image_content(url, "What is it?")) == expected  # served by the second encoder
    wait_for(lambda: language.health()["encoders_healthy"] == 1, 10, "the dead encoder was not taken out")

    # 2. No encoder left: image requests fail within the timeout with a clear error; text still works.
    second.kill()
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        ask(language, image_content(png(40, 40, seed=44), "Anyone there?"))
    assert time.monotonic() - start < ENCODE_TIMEOUT_S * 3
    assert err.value.status_code == 503
    assert "encode" in err.value.response.json()["error"]["message"]
    assert ask(language, "Text still works?")

    # 3. An encoder comes back on its old address: images work again, no language restart.
    encoders[0] = EncodeService(vl_ckpt, tmp, listen=first.listen).wait_ready()
    wait_for(lambda: language.health()["encoders_healthy"] >= 1, 15, "the restarted encoder was not brought back")
    assert ask(language, image_content(url, "What is it?")) == expected
    assert language.proc.poll() is None
