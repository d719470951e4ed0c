"""Structured outputs, tool calls and logit_bias through the real service and the official openai
client, on the random-weight tiny model (whose free output is never JSON): the constraint alone
makes every answer parse.
"""

from __future__ import annotations

import enum
import json
import shutil
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field, StringConstraints
from transformers import AutoTokenizer

from tests.services import LanguageService

MODEL = "tiny-text"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Card(BaseModel):
    color: Color
    count: int = Field(ge=0, le=100)
    tags: list[Annotated[str, StringConstraints(max_length=8)]] = Field(max_length=3)


@pytest.fixture(scope="module")
def service(qwen3_text_ckpt, tmp_path_factory):
    service = LanguageService(tmp_path_factory.mktemp("structured"), qwen3_text_ckpt, "--served-model-name", MODEL)
    try:
        service.wait_healthy()
        service.tokenizer = AutoTokenizer.from_pretrained(qwen3_text_ckpt)
        yield service
    finally:
        service.stop()


def ask(service: LanguageService, **kwargs):
    args = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe a card."}],
        "max_tokens": 120,
        "temperature": 1.0,
        **kwargs,
    }
    return service.client(timeout=120).chat.completions.create(**args)


def test_parse_with_a_pydantic_model_returns_an_object_for_every_prompt(service):
    client = service.client(timeout=120)
    for seed in range(10):
        reply = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": f"Card number {seed}?"}],
            response_format=Card,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        card = choice.message.parsed
        assert isinstance(card, Card) and 0 <= card.count <= 100 and len(card.tags) <= 3, choice.message.content


def test_json_object_is_json(service):
    # Any JSON object: nothing bounds its strings, and the random model rarely closes one, so a
    # nudge towards `"` and `}` lets the answers end within max_tokens (a real model ends them).
    nudge = {str(service.tokenizer.convert_tokens_to_ids(t)): 12 for t in ('"', "}")}
    for seed in range(3):
        reply = ask(service, response_format={"type": "json_object"}, seed=seed, max_tokens=400, logit_bias=nudge)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_guided_choice_and_regex(service):
    choices = ["yes", "no", "maybe so"]
    for seed in range(4):
        reply = ask(service, seed=seed, extra_body={"guided_choice": choices})
        assert reply.choices[0].message.content in choices
        assert reply.choices[0].finish_reason == "stop"
    reply = ask(service, seed=1, extra_body={"guided_regex": "[a-z]{3}-[0-9]{2}"})
    assert len(reply.choices[0].message.content) == 6 and reply.choices[0].message.content[3] == "-"


def test_n_choices_and_streaming_hold_the_constraint(service):
    choices = ["alpha", "beta", "gamma"]
    reply = ask(service, n=4, seed=5, extra_body={"guided_choice": choices})
    assert [c.message.content in choices for c in reply.choices] == [True] * 4
    stream = ask(service, seed=5, stream=True, extra_body={"guided_choice": choices})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == reply.choices[0].message.content  # choice 0 of n has the request's own seed


def _check_call(call, tools: list[dict]) -> dict:
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == set(spec["parameters"]["required"])
    if call.function.name == "get_weather":
        assert arguments["unit"] in ("celsius", "fahrenheit") and len(arguments["city"]) <= 12
    else:
        assert -12 <= arguments["zone"] <= 14
    assert call.type == "function" and call.id.startswith("call_")
    return arguments


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}], ids=["required", "named"]
)
def test_forced_tool_calls_validate_and_stream_the_same(service, tool_choice):
    tools = [WEATHER, TIME]
    for seed in range(3):
        reply = ask(service, tools=tools, tool_choice=tool_choice, seed=seed, max_tokens=200)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and not choice.message.content
        for call in choice.message.tool_calls:
            _check_call(call, tools)
        if isinstance(tool_choice, dict):
            assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        # The same seed streamed: the deltas reassemble to the same message.
        calls: dict[int, dict] = {}
        content, finish = "", None
        for chunk in ask(service, tools=tools, tool_choice=tool_choice, seed=seed, max_tokens=200, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                if part.id:
                    assert call["id"] is None, "the id comes once, with the first delta of a call"
                    call["id"] = part.id
                if part.function and part.function.name:
                    call["name"] += part.function.name
                if part.function and part.function.arguments:
                    call["arguments"] += part.function.arguments
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls
        ]


def test_parallel_tool_calls_false_gives_one_call(service):
    for seed in range(3):
        reply = ask(
            service, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, seed=seed, max_tokens=200
        )
        assert len(reply.choices[0].message.tool_calls) == 1


def test_a_tool_conversation_renders_and_answers(service):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    reply = ask(service, messages=messages, tools=[WEATHER], max_tokens=8, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason in ("length", "tool_calls")
    # The tool result and the earlier call are in the prompt the model saw.
    plain = ask(service, messages=messages[:1], tools=[WEATHER], max_tokens=1)
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 10


def test_logit_bias_moves_the_pick(service):
    def first_token(**kwargs) -> int:
        reply = ask(service, temperature=0, max_tokens=1, extra_body={"return_token_ids": True}, **kwargs)
        return reply.choices[0].model_extra["token_ids"][0]

    greedy = first_token()
    assert first_token(logit_bias={str(greedy): -100}) != greedy
    assert first_token(logit_bias={"100": 100}) == 100


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
            "response_format",
        ),
        ({"extra_body": {"guided_regex": "a(("}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "root ::= missing_rule"}}, "guided_grammar"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"extra_body": {"chat_template_kwargs": {"tools": []}}}, "chat_template_kwargs.tools"),
        (
            {"extra_body": {"guided_grammar": "root ::= " + " | ".join(f'"{i}"' for i in range(30_000))}},
            "guided_grammar",
        ),
    ],
    ids=[
        "bad-schema",
        "bad-regex",
        "bad-grammar",
        "guided-json-not-json",
        "empty-choice",
        "two-sources",
        "bad-tool-schema",
        "unknown-named-tool",
        "required-without-tools",
        "duplicate-tool",
        "bias-key",
        "bias-range",
        "reserved-template-kwarg",
        "huge-grammar",
    ],
)
def test_bad_constraints_get_a_400_naming_the_parameter(service, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(service, **kwargs)
    error = caught.value.body
    assert error["param"] == param, error
    assert error["message"] and "Traceback" not in error["message"]
    assert service.health()["status"] == "ok"
    assert ask(service, max_tokens=2).choices[0].finish_reason in ("length", "stop")


@pytest.fixture(scope="module")
def thinking_service(qwen3_text_ckpt, tmp_path_factory):
    """The tiny checkpoint with a thinking template, as Qwen3-VL-Thinking's: the generation
    prompt opens `<think>`, so answers start inside the reasoning."""
    ckpt = tmp_path_factory.mktemp("thinking") / "ckpt"
    shutil.copytree(qwen3_text_ckpt, ckpt)
    for name in ("tokenizer_config.json", "chat_template.json"):
        data = json.loads((ckpt / name).read_text())
        opening = "{%- if add_generation_prompt -%}\n    {{- '<|im_start|>assistant\\n' -}}"
        assert opening in data["chat_template"]
        data["chat_template"] = data["chat_template"].replace(
            opening, "{%- if add_generation_prompt -%}\n    {{- '<|im_start|>assistant\\n<think>\\n' -}}"
        )
        (ckpt / name).write_text(json.dumps(data))
    service = LanguageService(tmp_path_factory.mktemp("thinking-logs"), ckpt, "--served-model-name", MODEL)
    try:
        service.wait_healthy()
        service.think_end = AutoTokenizer.from_pretrained(ckpt).convert_tokens_to_ids("</think>")
        yield service
    finally:
        service.stop()


def _streamed_message(stream) -> tuple[str, str]:
    reasoning = content = ""
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
    return reasoning, content


def test_reasoning_comes_apart_and_the_schema_holds_after_it(thinking_service):
    # A nudge towards </think> (the random model would rarely close its reasoning on its own).
    bias = {str(thinking_service.think_end): 4}
    client = thinking_service.client(timeout=120)
    reasonings = []
    card_format = {"type": "json_schema", "json_schema": {"name": "Card", "schema": Card.model_json_schema()}}
    for seed in range(5):
        args = dict(
            model=MODEL,
            messages=[{"role": "user", "content": f"Card {seed}?"}],
            max_tokens=300,
            temperature=1.0,
            seed=seed,
            logit_bias=bias,
            response_format=card_format,
        )
        message = client.chat.completions.create(**args).choices[0].message
        Card.model_validate_json(message.content)  # raises unless the answer after </think> fits
        reasoning = message.model_extra["reasoning_content"]
        # The first </think> ends the reasoning (the JSON after it may hold the text "</think>" in a string).
        assert "<think>" not in reasoning and "</think>" not in reasoning
        reasonings.append(reasoning)
        assert _streamed_message(client.chat.completions.create(stream=True, **args)) == (reasoning, message.content)
    assert any(reasonings), "every answer closed its reasoning at once: the nudge is too strong"
