"""The language service as users run it: `splitvl language` in a subprocess on loopback, the
official openai client, the real engine on a tiny Qwen3-VL checkpoint, no encoder. Greedy
output is checked against transformers' `generate` on the same prompt.

Also home of `LanguageService`, the subprocess helper the other test_api_* files share.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from language_server.api.detokenizer import TokenBytes
from tests.reference import hf_model
from tests.services import LanguageService, free_port  # noqa: F401 - shared by the other test_api_* files
from tests.services import alive as _alive
from tests.services import children as _children  # noqa: F401

MAX_TOKENS = 16
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="session")
def vl_service(vl_ckpt, tmp_path_factory):
    """The VL checkpoint without an encoder; small image limits so 413 and 'too many' are cheap."""
    service = LanguageService(
        tmp_path_factory.mktemp("api"),
        vl_ckpt,
        "--served-model-name",
        "tiny-vl",
        config={"max_image_url_bytes": 4096, "max_images_per_request": 2},
    )
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def tokenizer(vl_ckpt):
    return AutoTokenizer.from_pretrained(vl_ckpt)


@pytest.fixture(scope="session")
def token_bytes(tokenizer):
    return TokenBytes(tokenizer)


@pytest.fixture(scope="session")
def hf_greedy(vl_ckpt, tokenizer) -> list[int]:
    """transformers' greedy tokens for MESSAGES (fp32, CPU), EOS included if it is generated."""
    ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    model = hf_model(vl_ckpt)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    return out[0, ids.shape[1] :].tolist()


def chat(service: LanguageService, **kwargs):
    args = {"model": "tiny-vl", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return service.client().chat.completions.create(**args)


def post(service: LanguageService, path: str, body: dict | bytes, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(f"{service.url}{path}", json=None if content else body, content=content, timeout=60, **kwargs)


def test_chat_greedy_equals_transformers(vl_service, tokenizer, token_bytes, hf_greedy):
    response = chat(vl_service, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    # Token by token: the bytes of each generated token identify it.
    assert [c.bytes for c in choice.logprobs.content] == [list(token_bytes(t)) for t in hf_greedy]
    assert choice.message.content == tokenizer.decode(hf_greedy, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if len(hf_greedy) < MAX_TOKENS else "length")
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_len = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert response.usage.prompt_tokens == prompt_len
    assert response.usage.completion_tokens == len(hf_greedy)
    assert response.usage.total_tokens == prompt_len + len(hf_greedy)


def test_return_token_ids_lists_the_generated_ids(vl_service, hf_greedy):
    """vLLM's extension: the ids themselves, e.g. for ids a tokenizer cannot spell."""
    choice = chat(vl_service, extra_body={"return_token_ids": True}).choices[0]
    assert choice.model_extra["token_ids"] == hf_greedy
    assert "token_ids" not in chat(vl_service).choices[0].model_extra


def test_logprobs_format(vl_service, hf_greedy):
    content = chat(vl_service, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert len(content) == len(hf_greedy)
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one, listed first with the same logprob.
        assert entry.top_logprobs[0].bytes == entry.bytes
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert chat(vl_service).choices[0].logprobs is None


def test_streaming_equals_non_streaming(vl_service, tokenizer, hf_greedy):
    chunks = list(chat(vl_service, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(hf_greedy, skip_special_tokens=True)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if len(hf_greedy) < MAX_TOKENS else "length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(hf_greedy)
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_seeded_sampling(vl_service):
    kwargs = {"n": 3, "temperature": 1.5, "seed": 1234, "max_tokens": 12, "ignore_eos": True}
    first = chat(vl_service, **{k: v for k, v in kwargs.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})
    again = chat(vl_service, **{k: v for k, v in kwargs.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices], "the same seed must give the same samples"
    assert len(set(texts)) > 1, "the n choices of one request must be sampled independently"
    assert first.usage.completion_tokens == 3 * 12
    other = chat(vl_service, n=1, temperature=1.5, seed=99, max_tokens=12, extra_body={"ignore_eos": True})
    assert other.choices[0].message.content != texts[0]


def test_streaming_n_choices(vl_service):
    chunks = list(chat(vl_service, n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] == chat(vl_service).choices[0].message.content


def test_stop_string_across_a_token_boundary(vl_service, token_bytes, hf_greedy):
    # A stop string made of the end of one generated token and the start of the next.
    pieces = [token_bytes(t).decode("utf-8", errors="strict") if _valid(token_bytes(t)) else None for t in hf_greedy]
    k = next(i for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1] and pieces[i].strip())
    stop = pieces[k][-1] + pieces[k + 1][:2]
    full = chat(vl_service).choices[0].message.content
    expected = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(chat(vl_service, stop=[stop, "never-generated"], stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            choice = chat(vl_service, stop=stop).choices[0]
            text, finish = choice.message.content, [choice.finish_reason]
        assert (text, finish) == (expected, ["stop"])
    # Stop token ids end generation like EOS (the token itself is not shown).
    choice = chat(vl_service, extra_body={"stop_token_ids": [hf_greedy[2]]}).choices[0]
    assert choice.finish_reason == "stop"


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_completions_text_token_ids_and_echo(vl_service, tokenizer):
    client = vl_service.client()
    prompt = "The quick brown fox"
    by_text = client.completions.create(model="tiny-vl", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    by_ids = client.completions.create(model="tiny-vl", prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    lp = by_text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    echoed = client.completions.create(model="tiny-vl", prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + by_text.choices[0].text
    streamed = client.completions.create(model="tiny-vl", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == by_text.choices[0].text


def test_prefix_cache_reports_cached_tokens(vl_service):
    messages = [{"role": "user", "content": "word " * 200}]
    chat(vl_service, messages=messages, max_tokens=2)
    usage = chat(vl_service, messages=messages, max_tokens=2).usage
    assert usage.prompt_tokens_details.cached_tokens >= 192  # whole 16-token blocks of the shared prompt


def test_engine_process_starts_with_huge_page_malloc(vl_service):
    """The engine receives encode results into fresh buffers; THP malloc keeps that fast."""
    environs = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in vl_service.children]
    assert any(b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in env for env in environs)


def test_models_health_metrics(vl_service):
    client = vl_service.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-vl"]
    assert client.models.retrieve("tiny-vl").id == "tiny-vl"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")
    health = vl_service.health()
    assert health["status"] == "ok" and health["encoders_total"] == 0
    metrics = httpx.get(f"{vl_service.url}/metrics").text
    for name in (
        "splitvl_time_to_first_token_seconds",
        "splitvl_inter_token_latency_seconds",
        "splitvl_e2e_request_latency_seconds",
        "splitvl_num_requests_waiting",
        "splitvl_num_requests_running",
        "splitvl_kv_blocks_used",
        "splitvl_kv_blocks_free",
        "splitvl_prefix_cache_hit_rate",
        "splitvl_encoder_bytes_received_total",
        "splitvl_http_request_bytes_received_total",
        "splitvl_http_requests_in_flight",
        "splitvl_engine_failed_steps_total",
    ):
        assert f"\n{name}" in metrics, name


PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAcCBl"
    "sQAAAABJRU5ErkJggg=="
)


def _image_message(*urls: str, role: str = "user", **image_fields) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u, **image_fields}} for u in urls]
    return [{"role": role, "content": [*parts, {"type": "text", "text": "what is this?"}]}]


def _chat_body(**kwargs) -> dict:
    return {"model": "tiny-vl", "messages": MESSAGES, "max_tokens": 4, **kwargs}


BAD_CHAT = [
    (_chat_body(temperature="0.5"), 400, "temperature"),
    (_chat_body(temperature=2.5), 400, "temperature"),
    (_chat_body(top_p=0), 400, "top_p"),
    (_chat_body(top_k=-2), 400, "top_k"),
    (_chat_body(n=0), 400, "n"),
    (_chat_body(max_tokens=0), 400, "max_tokens"),
    (_chat_body(max_tokens=10**6), 400, "max_tokens"),
    (_chat_body(presence_penalty=3), 400, "presence_penalty"),
    (_chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (_chat_body(top_logprobs=2), 400, "top_logprobs"),
    (_chat_body(stop=[""]), 400, "stop"),
    (_chat_body(stop=[1]), 400, "stop[0]"),
    (_chat_body(stop_token_ids=[10**9]), 400, "stop_token_ids"),
    (_chat_body(seed="x"), 400, "seed"),
    (_chat_body(model="no-such-model"), 400, "model"),
    (_chat_body(messages=[]), 400, "messages"),
    (_chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    (_chat_body(messages=[{"role": "user"}]), 400, "messages[0].content"),
    (_chat_body(messages=[{"role": "user", "content": "word " * 9000}]), 400, "messages"),
    (_chat_body(messages=_image_message("data:image/png;base64,!!!")), 400, "messages[0].content[0].image_url"),
    (_chat_body(messages=_image_message("data:text/plain;base64,aGk=")), 400, "messages[0].content[0].image_url"),
    (_chat_body(messages=_image_message("/etc/hostname")), 400, "messages[0].content[0].image_url"),
    (_chat_body(messages=_image_message("relative.png")), 400, "messages[0].content[0].image_url"),
    (_chat_body(messages=_image_message("https://example.com/" + "a" * 9000)), 400, "messages[0].content[0].image_url"),
    (_chat_body(messages=_image_message(PNG_1PX, PNG_1PX, PNG_1PX)), 400, "messages"),
    (_chat_body(messages=_image_message(PNG_1PX, role="assistant")), 400, "messages[0].content[0].image_url"),
    (
        _chat_body(messages=_image_message("data:image/png;base64," + "A" * 8000)),
        413,
        "messages[0].content[0].image_url",
    ),
    (_chat_body(messages=[{"role": "user", "content": "<|image_pad|>"}]), 400, "messages"),
    (_chat_body(tools=[{"type": "retrieval"}]), 400, "tools[0].type"),
    (_chat_body(tools=[{"type": "function", "function": {"name": "has space"}}]), 400, "tools[0].function.name"),
    (_chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
    # Every field works or is refused by name: OpenAI's that this service does not serve...
    *[
        (_chat_body(**{name: value}), 400, name)
        for name, value in (
            ("tool_choice", "auto"),
            ("parallel_tool_calls", False),
            ("functions", [{"name": "f"}]),
            ("function_call", "auto"),
            ("reasoning_effort", "low"),
            ("verbosity", "low"),
            ("modalities", ["text", "audio"]),
            ("audio", {"voice": "alloy", "format": "wav"}),
            ("prediction", {"type": "content", "content": "x"}),
            ("web_search_options", {}),
            ("response_format", {"type": "xml"}),
            ("service_tier", "flex"),
        )
    ],
    # ... and anything unknown, at any depth.
    (_chat_body(best_of=2), 400, "best_of"),
    (_chat_body(top_a=0.5), 400, "top_a"),
    (_chat_body(messages=[{"role": "user", "content": "hi", "refusal": None}]), 400, "messages[0].refusal"),
    (
        _chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache": 1}]}]),
        400,
        "messages[0].content[0].cache",
    ),
    (
        _chat_body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        400,
        "messages[0].content[0]",
    ),
    (_chat_body(min_tokens=5, max_tokens=4), 400, "min_tokens"),
    (_chat_body(messages=_image_message(PNG_1PX, detail="huge")), 400, "messages[0].content[0].image_url.detail"),
    # No encoder is configured: a valid image cannot be served (and says why).
    (_chat_body(messages=_image_message(PNG_1PX)), 503, None),
]
BAD_COMPLETIONS = [
    ({"model": "tiny-vl", "prompt": [10**9]}, 400, "prompt"),
    ({"model": "tiny-vl", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny-vl", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny-vl", "prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"model": "tiny-vl"}, 400, "prompt"),
    ({"model": "tiny-vl", "prompt": "hi", "logit_bias": {"x1": 1}}, 400, "logit_bias"),
    ({"model": "tiny-vl", "prompt": "hi", "guided_regex": "a(("}, 400, "guided_regex"),
    ({"model": "tiny-vl", "prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
]


def test_invalid_requests_get_openai_errors_and_the_service_keeps_serving(vl_service):
    cases = [("/v1/chat/completions", *c) for c in BAD_CHAT] + [("/v1/completions", *c) for c in BAD_COMPLETIONS]
    cases += [("/v1/chat/completions", b"{not json", 400, None), ("/v1/chat/completions", b"[1, 2]", 400, None)]
    for path, body, status, param in cases:
        response = post(vl_service, path, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] == param and error["message"] and "Traceback" not in error["message"], (body, error)
    assert post(vl_service, "/v1/nope", {}).json()["error"]["code"] == "not_found"
    # The official client raises the matching exception with OpenAI's fields.
    with pytest.raises(openai.BadRequestError) as info:
        chat(vl_service, temperature=-1)
    assert info.value.param == "temperature" and info.value.type == "invalid_request_error"
    assert chat(vl_service).choices[0].message.content, "the service must keep serving after errors"


def _wait_idle(service: LanguageService, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = service.health()
        if (health["running"], health["waiting"], health["kv_blocks_free"]) == (0, 0, health["kv_blocks_total"]):
            return health
        assert time.monotonic() < deadline, f"engine work was not released: {health}"
        time.sleep(0.1)


def _running(service: LanguageService, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while service.health()["running"] == 0:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.05)


def test_client_disconnect_aborts_the_engine_request(vl_service):
    long = _chat_body(max_tokens=6000, ignore_eos=True, temperature=0)
    # Streaming: read a few chunks, then hang up.
    with httpx.stream(
        "POST", f"{vl_service.url}/v1/chat/completions", json={**long, "stream": True}, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert vl_service.health()["running"] == 1
    _wait_idle(vl_service)
    # Non-streaming: the client gives up waiting (its timeout closes the connection).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{vl_service.url}/v1/chat/completions", json=long, timeout=httpx.Timeout(60, read=1.5))
    _wait_idle(vl_service)
    text = httpx.get(f"{vl_service.url}/metrics").text
    assert "splitvl_http_requests_in_flight 0.0" in text
    # Each is counted and logged as cancelled, not as a success.
    assert 'splitvl_requests_total{finish_reason="cancelled"} 2.0' in text
    log = vl_service.log.read_text()
    assert '"POST /v1/chat/completions" 200 (cancelled: the client disconnected mid-stream)' in log
    assert '"POST /v1/chat/completions" 499 (cancelled: the client disconnected)' in log


def test_sampling_parameters_reach_the_engine(vl_service):
    free = {"ignore_eos": True}
    greedy = chat(vl_service, max_tokens=24, extra_body=free).choices[0].message.content
    hot = {"temperature": 1.5, "seed": 7, "max_tokens": 24}
    assert chat(vl_service, **hot, extra_body=free).choices[0].message.content != greedy
    # Filters that leave only the most likely token make hot sampling greedy again.
    assert chat(vl_service, **hot, top_p=1e-6, extra_body=free).choices[0].message.content == greedy
    for narrow in ({"top_k": 1}, {"min_p": 1.0}):
        assert chat(vl_service, **hot, extra_body={**free, **narrow}).choices[0].message.content == greedy, narrow
    # Penalties on repeated tokens change a greedy continuation that repeats itself.
    long_greedy = chat(vl_service, max_tokens=48, extra_body=free).choices[0].message.content
    penalties = [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {**free, "repetition_penalty": 3.0}},
    ]
    for penalty in penalties:
        kwargs = {"extra_body": free, **penalty}
        assert chat(vl_service, max_tokens=48, **kwargs).choices[0].message.content != long_greedy, penalty


def test_completions_several_prompts_times_n(vl_service, tokenizer):
    client = vl_service.client()
    single = client.completions.create(model="tiny-vl", prompt="The quick", max_tokens=4, temperature=0)
    multi = client.completions.create(
        model="tiny-vl", prompt=["The quick", "brown fox"], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    texts = [c.text for c in multi.choices]
    assert texts[0] == texts[1] == single.choices[0].text and texts[2] == texts[3]
    # Each prompt counts once, however many choices it has.
    assert multi.usage.prompt_tokens == len(tokenizer("The quick")["input_ids"] + tokenizer("brown fox")["input_ids"])


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(vl_service, hf_greedy):
    first = hf_greedy[0]
    stopped = chat(vl_service, max_tokens=8, extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = chat(
        vl_service, max_tokens=8, extra_body={"stop_token_ids": [first], "min_tokens": 4, "return_token_ids": True}
    )
    ids = held.choices[0].model_extra["token_ids"]
    assert len(ids) >= 4 and first not in ids[:4]
    text = chat(vl_service, max_tokens=8).choices[0].message.content
    assert chat(vl_service, max_tokens=8, stop=[text[:2]]).usage.completion_tokens < 4
    assert chat(vl_service, max_tokens=8, stop=[text[:2]], extra_body={"min_tokens": 4}).usage.completion_tokens >= 4


def test_bookkeeping_hints_are_accepted(vl_service):
    reply = chat(
        vl_service,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        modalities=["text"],
        extra_body={"prompt_cache_key": "k", "safety_identifier": "s"},
    )
    assert reply.choices[0].message.content


def test_engine_death_fails_requests_and_stops_the_service(vl_service):
    """Last in this module: it takes the shared service down."""
    engine = next(
        pid for pid in vl_service.children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid)
    )
    stream = chat(vl_service, stream=True, max_tokens=6000, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="engine"):
        for _ in chunks:
            pass
    assert vl_service.proc.wait(30) == 1, "a service without its engine must exit non-zero"
    assert "the engine process exited with code -9; shutting down" in vl_service.log.read_text()
