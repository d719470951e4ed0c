"""The HTTP process under heavy or ending work: huge texts never stall /health or other streams,
and SIGTERM drains (running requests finish, late ones get a clean 503) instead of cutting.
Real `splitvl language` processes on loopback, the tiny text-only checkpoint."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.services import LanguageService, wait_gone

MODEL = "tiny-text"


def body(content: str, **kwargs) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kwargs}


def worst_health_latency(service: LanguageService, seconds: float) -> float:
    worst, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        assert httpx.get(f"{service.url}/health", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    return worst


def stream_gaps(service: LanguageService, tokens: int) -> list[float]:
    """Seconds between the SSE lines of one streamed request."""
    gaps, last = [], time.monotonic()
    with httpx.stream(
        "POST",
        f"{service.url}/v1/chat/completions",
        timeout=60,
        json=body("hi", max_tokens=tokens, stream=True, ignore_eos=True),
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                now = time.monotonic()
                gaps.append(now - last)
                last = now
    return gaps[1:]  # the first waits for the prefill


@pytest.fixture(scope="module")
def long_context(qwen3_text_ckpt, tmp_path_factory):
    """A context long enough that multi-megabyte texts pass the length bound and get tokenized."""
    service = LanguageService(
        tmp_path_factory.mktemp("long"),
        qwen3_text_ckpt,
        "--served-model-name",
        MODEL,
        config={"max_model_len": 400_000},
    )
    service.wait_healthy()
    yield service
    service.stop()


def test_a_text_too_long_for_any_tokenization_is_refused_before_tokenizing(qwen3_text_ckpt, tmp_path):
    service = LanguageService(tmp_path, qwen3_text_ckpt, "--served-model-name", MODEL)
    service.wait_healthy()
    try:
        start = time.monotonic()
        response = httpx.post(f"{service.url}/v1/chat/completions", json=body("hello world " * 900_000), timeout=60)
        assert time.monotonic() - start < 3  # tokenizing these 10.8 MB would take ~25 s
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    finally:
        assert service.stop() == 0


def test_tokenizing_a_long_text_stalls_neither_health_nor_streams(long_context):
    # 12 MB, under the length bound at this context (3 × 20 × 400k characters): about 8 s of
    # tokenizing on a 2-core CI machine, so the measurements below fall inside it.
    text = "hello world, this is text! " * 440_000
    result: dict = {}

    def send() -> None:
        result["response"] = httpx.post(
            f"{long_context.url}/v1/chat/completions", json=body(text, max_tokens=2), timeout=120
        )

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)
    assert worst_health_latency(long_context, 2.0) < 0.5
    assert max(stream_gaps(long_context, 40)) < 0.5
    assert sender.is_alive(), "the long text was tokenized too fast to show anything; make it longer"
    sender.join()
    response = result["response"]
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def _sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_sigterm_drains_running_requests_and_answers_late_ones_cleanly(qwen3_text_ckpt, tmp_path):
    service = LanguageService(
        tmp_path, qwen3_text_ckpt, "--served-model-name", MODEL, config={"shutdown_timeout_s": 3, "max_num_seqs": 32}
    )
    service.wait_healthy()
    engine = service.children
    outcomes: list[tuple[str, object]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        # Half finish within the drain window (8 tokens), half outlast it (4000 tokens).
        request = body(f"request {i}", max_tokens=8 if i % 2 else 4000, ignore_eos=True, stream=i % 4 >= 2)
        with httpx.stream("POST", f"{service.url}/v1/chat/completions", json=request, timeout=60) as response:
            if request["stream"]:
                outcome = (f"stream {response.status_code}", _sse_events(response))
            else:
                response.read()
                outcome = (f"json {response.status_code}", (response.json(), response.headers.get("retry-after")))
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30

    def admitted() -> int:
        """Requests in the engine or done: under load some may still be tokenizing, and a
        request that reaches the HTTP process after SIGTERM is rightly refused (another test)."""
        health = service.health()
        with lock:
            return len(outcomes) + health["running"] + health["waiting"]

    while service.health()["running"] < 16 or admitted() < 32:
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.05)
    service.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = httpx.post(f"{service.url}/v1/chat/completions", json=body("late", max_tokens=2), timeout=10)
    assert late.status_code == 503 and late.headers["retry-after"].isdigit()
    assert late.json()["error"]["code"] == "server_shutting_down"
    health = httpx.get(f"{service.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    for t in threads:
        t.join(60)
    assert service.proc.wait(30) == 0

    assert len(outcomes) == 32
    completed = ended = 0
    for kind, detail in outcomes:
        if kind == "json 200":
            completed += 1
        elif kind == "json 503":
            error, retry_after = detail
            assert error["error"]["code"] == "server_shutting_down" and retry_after.isdigit()
            ended += 1
        elif kind == "stream 200":
            assert detail[-1] == "[DONE]", detail[-3:]
            last = json.loads(detail[-2])
            if "error" in last:
                assert last["error"]["code"] == "server_shutting_down"
                ended += 1
            else:
                assert last["choices"][0]["finish_reason"] == "length"
                completed += 1
        else:
            raise AssertionError(f"unexpected outcome {kind}: {detail}")
    assert completed == 16 and ended == 16
    log = service.log.read_text()
    assert "Traceback" not in log and "ending 16 requests still running" in log
    assert not wait_gone(engine), "the engine outlived the service"
