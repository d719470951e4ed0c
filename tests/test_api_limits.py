"""Service-wide limits of `splitvl language`: API key, admission (429), text-only checkpoints,
body size, and a clean shutdown that takes the engine process with it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.services import wait_gone
from tests.test_api_server import PNG_1PX, LanguageService, _image_message

KEY = "sekrit-key"


@pytest.fixture(scope="module")
def text_service(qwen3_text_ckpt, tmp_path_factory):
    """Text-only Qwen3-MoE, API key from the command line, limits from a YAML file."""
    service = LanguageService(
        tmp_path_factory.mktemp("api_limits"),
        qwen3_text_ckpt,
        api_key=KEY,
        config={
            "served_model_name": "tiny-text",
            "max_queued_requests": 2,
            "max_image_url_bytes": 1024,
            "max_images_per_request": 1,
            "cors_allow_origins": ["https://app.example"],
        },
    )
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()


def _chat(client: openai.OpenAI, **kwargs):
    args = {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    return client.chat.completions.create(**args)


def test_api_key(text_service):
    assert _chat(text_service.client()).choices[0].message.content is not None
    client = openai.OpenAI(base_url=f"{text_service.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        _chat(client)
    assert info.value.code == "invalid_api_key"
    missing = httpx.get(f"{text_service.url}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{text_service.url}/health").status_code == 200
    assert httpx.get(f"{text_service.url}/metrics").status_code == 200


def test_cors_allows_the_configured_origin_only(text_service):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(
            f"{text_service.url}/v1/chat/completions",
            timeout=10,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )

    allowed = preflight("https://app.example")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_overload_gets_429_and_recovers(text_service):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "model": "tiny-text",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6000,
        "ignore_eos": True,
        "stream": True,
    }
    with contextlib.ExitStack() as stack:
        readers = []  # held: dropping a line iterator closes its connection
        for _ in range(2):  # fill both slots with long streams, each surely admitted
            response = stack.enter_context(
                httpx.stream("POST", f"{text_service.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
            )
            readers.append(response.iter_lines())
            next(readers[-1])
        with pytest.raises(openai.RateLimitError) as info:
            _chat(text_service.client())
        assert info.value.status_code == 429 and info.value.code == "too_many_requests"
    deadline = time.monotonic() + 20
    while True:  # the closed streams free their slots
        try:
            assert _chat(text_service.client()).choices
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_text_only_model_refuses_images(text_service):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(text_service.client(), messages=_image_message(PNG_1PX))
    assert info.value.code == "images_not_supported"


def test_body_too_large(text_service):
    # One image of at most 1024 bytes allowed: the body limit is about 1 MiB of text around it.
    response = httpx.post(
        f"{text_service.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny-text", "messages": [{"role": "user", "content": "x" * (2 << 20)}]},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_engine_failure_is_reported_with_a_clear_message(tmp_path):
    from models.tiny_checkpoint import write_tiny_checkpoint

    # Config and tokenizer but no weights: the HTTP side loads, the engine cannot.
    ckpt = write_tiny_checkpoint(tmp_path / "no_weights", arch="qwen3_moe", metadata_only=True)
    proc = subprocess.run(
        [sys.executable, "-m", "splitvl", "language", "--model", str(ckpt), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"splitvl language: the engine failed to start: CheckpointError: {ckpt} has no .safetensors weights"
    )


def test_sigterm_stops_the_service_and_its_engine(text_service):
    """Last in this module: it stops the shared service."""
    assert text_service.children, "the engine process should be a child of the service"
    assert text_service.stop() == 0
    assert not wait_gone(text_service.children), "the engine outlived the service"
