"""Tool calls in the answer text: whole answers against hand-written results, and the same answers
streamed split at every position, a character at a time, and token by token through the tiny
checkpoint's real tokenizer and the incremental detokenizer, all of which must agree."""

from __future__ import annotations

import json
import random
import re

import pytest
from transformers import AutoTokenizer

from language_server.api.detokenizer import IncrementalDetokenizer, TokenBytes
from language_server.api.tool_parser import (
    ContentDelta,
    ToolCall,
    ToolCallArguments,
    ToolCallParser,
    ToolCallStart,
    collect,
    parse_tool_calls,
)
from models.tiny_tokenizer import write_tokenizer_files

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NESTED_ARGS = (
    '{"code": "if x: {print(\\"}\\")}\\n</tool_call>\\n<tool_call>", "list": [1, -2.5e3, [], {}, [{"a": null}]],'
    ' "flags": {"on": true, "off": false}, "path": "C:\\\\tmp\\\\", "esc": "\\u00e9\\ud83d\\ude42\\t"}'
)
UNICODE_ARGS = '{"ville": "Zürich", "问题": "天气怎么样？🙂", "note": "a}b]c"}'


def call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


# (output, content, [(name, arguments)]) — what a client must end up with.
CASES = [
    ("Just an answer, no tools.", "Just an answer, no tools.", []),
    ("Trailing whitespace stays when no call follows:  \n", "Trailing whitespace stays when no call follows:  \n", []),
    ("A < b and <tool and <tool_cal are text", "A < b and <tool and <tool_cal are text", []),
    (call(WEATHER), "", [("get_weather", '{"city": "Paris"}')]),
    ("Let me check.\n" + call(WEATHER), "Let me check.", [("get_weather", '{"city": "Paris"}')]),
    # Several calls; text between and after them is dropped.
    (
        "Two calls:\n"
        + call(WEATHER)
        + "\n"
        + call('{"name": "get_time", "arguments": {"tz": "CET"}}')
        + "\nand some text after.",
        "Two calls:",
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')],
    ),
    (
        call(WEATHER) + " between " + call('{"name": "b", "arguments": {}}') + "\n",
        "",
        [("get_weather", '{"city": "Paris"}'), ("b", "{}")],
    ),
    # Braces, brackets, escapes and the markers themselves inside JSON strings.
    ("Code:\n" + call('{"name": "run", "arguments": ' + NESTED_ARGS + "}"), "Code:", [("run", NESTED_ARGS)]),
    (
        "Unicode — ok.\n" + call('{"name": "météo", "arguments": ' + UNICODE_ARGS + "}"),
        "Unicode — ok.",
        [("météo", UNICODE_ARGS)],
    ),
    # Arguments as written: spacing and newlines inside them are kept.
    (call('{"name":"f","arguments":{\n  "a" : [ 1 ,2 ]\n}}'), "", [("f", '{\n  "a" : [ 1 ,2 ]\n}')]),
    # Arguments before the name; no </tool_call> at the end (the output stopped after the object).
    (call('{"arguments": {"q": "x"}, "name": "search"}'), "", [("search", '{"q": "x"}')]),
    ("Go " + '<tool_call>\n{"name": "f", "arguments": {"k": 1}}', "Go", [("f", '{"k": 1}')]),
    # Missing or null arguments are "{}"; a JSON string is the arguments text itself; extra keys are ignored.
    (call('{"name": "ping"}'), "", [("ping", "{}")]),
    (call('{"name": "ping", "arguments": null}'), "", [("ping", "{}")]),
    (call('{"name": "f", "arguments": "{\\"a\\": 1}"}'), "", [("f", '{"a": 1}')]),
    (call('{"name": "f", "id": [1, {"x": "y"}], "arguments": {"a": 1}}'), "", [("f", '{"a": 1}')]),
    # A missing closing brace of the outer object: the arguments are complete, so the call is.
    (call('{"name": "f", "arguments": {"a": 1}'), "", [("f", '{"a": 1}')]),
]

# Malformed calls: before the name is complete, not a call (its text is content); after, the call
# keeps what was streamed.
MALFORMED = [
    ("Hi " + call("not json"), "Hi " + call("not json"), []),
    (
        "Hi\n" + call('{"name": 5, "arguments": {}}') + " bye",
        "Hi\n" + call('{"name": 5, "arguments": {}}') + " bye",
        [],
    ),
    (call('{"arguments": {}}'), call('{"arguments": {}}'), []),
    (call('{"name": "", "arguments": {}}'), call('{"name": "", "arguments": {}}'), []),
    (call('{"name": "f", "name": "g"}'), "", [("f", "")]),
    ("Cut " + '<tool_call>\n{"name": "get_w', "Cut " + '<tool_call>\n{"name": "get_w', []),
    ("Cut " + '<tool_call>\n{"name": "f", "arguments": {"a": [1, ', "Cut", [("f", '{"a": [1, ')]),
    # A raw newline cannot be in a JSON string: the call breaks there, after its name went out.
    (call('{"name": "f", "arguments": {"a": "x\ny"}}'), "", [("f", '{"a": "x')]),
    # A broken call, then a real one: the broken one is content, the real one is found.
    (
        "A " + call('{"name": [}') + "\n" + call(WEATHER),
        "A " + call('{"name": [}'),
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "A <tool_call>\n<tool_call>\n" + WEATHER + "\n</tool_call>",
        "A <tool_call>",
        [("get_weather", '{"city": "Paris"}')],
    ),
    # After a call, even a broken one is dropped with the rest of the text.
    (call(WEATHER) + "\n" + call("oops"), "", [("get_weather", '{"city": "Paris"}')]),
    ("", "", []),
]

ALL = CASES + MALFORMED


def fixed_ids():
    counter = iter(range(1_000_000))
    return lambda: f"call_{next(counter)}"


def summary(content: str, calls: list[ToolCall]) -> tuple[str, list[tuple[str, str]]]:
    return content, [(c.name, c.arguments) for c in calls]


def stream(pieces: list[str], parallel: bool = True) -> list:
    parser = ToolCallParser(parallel, fixed_ids())
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events + parser.finish()


def check_event_order(events: list) -> None:
    """Each call starts once, in index order, before any of its argument fragments; nothing is empty."""
    started = 0
    for event in events:
        if isinstance(event, ToolCallStart):
            assert event.index == started and event.name
            started += 1
        elif isinstance(event, ToolCallArguments):
            assert event.index < started and event.arguments
        else:
            assert isinstance(event, ContentDelta) and event.text


@pytest.mark.parametrize("output,content,calls", ALL)
def test_whole_answer(output, content, calls):
    assert summary(*parse_tool_calls(output, new_id=fixed_ids())) == (content, calls)


@pytest.mark.parametrize("output,content,calls", CASES)
def test_well_formed_calls_carry_loadable_arguments(output, content, calls):
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("output,content,calls", ALL)
def test_every_split_point_and_one_char_at_a_time(output, content, calls):
    whole = summary(*parse_tool_calls(output))
    assert whole == (content, calls)
    for i in range(len(output) + 1):
        events = stream([output[:i], output[i:]])
        check_event_order(events)
        assert summary(*collect(events)) == whole, f"split at {i}: {output[:i]!r} | {output[i:]!r}"
    events = stream(list(output))
    check_event_order(events)
    assert summary(*collect(events)) == whole


def test_content_streams_at_once_and_holds_back_only_a_possible_marker():
    parser = ToolCallParser()
    shown = ""
    for prefix_end, expected in [
        ("Sure", "Sure"),
        (" <", "Sure"),
        ("to", "Sure"),
        ("ol", "Sure"),
        ("s!", "Sure <tools!"),
        (" \n", "Sure <tools!"),
        ("ok", "Sure <tools! \nok"),
        ("\n<tool_ca", "Sure <tools! \nok"),
    ]:
        shown += "".join(e.text for e in parser.feed(prefix_end))
        assert shown == expected, prefix_end
    events = parser.feed("ll>\n" + WEATHER[:20])
    assert not any(isinstance(e, ContentDelta) for e in events)
    assert collect(events + parser.feed(WEATHER[20:] + "\n</tool_call>"))[1][0].name == "get_weather"


def test_name_goes_out_when_complete_and_arguments_as_they_arrive():
    output = "Ok.\n" + call('{"name": "run", "arguments": ' + NESTED_ARGS + "}")
    parser = ToolCallParser(new_id=fixed_ids())
    start_at, fragments = None, []
    name_end = output.index('"run"') + len('"run"')
    for i, ch in enumerate(output):
        for event in parser.feed(ch):
            if isinstance(event, ToolCallStart):
                start_at = i + 1
            elif isinstance(event, ToolCallArguments):
                fragments.append((i + 1, event.arguments))
    assert start_at == name_end, "the start goes out with the name's closing quote"
    assert not parser.finish()
    args_start = output.index(NESTED_ARGS)
    # One fragment per character of the arguments, each out as soon as it arrived.
    assert fragments == [(args_start + k + 1, ch) for k, ch in enumerate(NESTED_ARGS)]


def test_parallel_false_keeps_only_the_first_call():
    output = "Two:\n" + call(WEATHER) + "\n" + call('{"name": "b", "arguments": {}}')
    for i in range(len(output) + 1):
        events = stream([output[:i], output[i:]], parallel=False)
        assert summary(*collect(events)) == ("Two:", [("get_weather", '{"city": "Paris"}')])
    # A broken first call is text, so the next real one is the first call.
    output = "A " + call("{bad") + call('{"name": "b", "arguments": {}}') + call(WEATHER)
    assert summary(*collect(stream([output], parallel=False))) == ("A " + call("{bad"), [("b", "{}")])


def test_ids_and_openai_shapes():
    output = call(WEATHER) + call(WEATHER)
    content, calls = parse_tool_calls(output)
    assert content == "" and len({c.id for c in calls}) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    events = stream(list(output))
    start = events[0]
    assert start.to_delta() == {
        "index": 0,
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert events[1].to_delta() == {"index": 0, "function": {"arguments": "{"}}
    assert collect(events)[1][1].to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([0, -1, 3.25, 1e-7, 123456789012, True, False, None])
    if kind in (1, 2, 3):
        alphabet = ["a", " ", "}", "{", "]", '"', "\\", "\n", "</tool_call>", "<tool_call>", "é", "你", "🙂", "/", ":"]
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind in (4, 5):
        return {
            "k" + str(i) + rng.choice(["", "}", '"']): _random_value(rng, depth + 1) for i in range(rng.randrange(4))
        }
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_random_calls_streamed_at_random_splits():
    rng = random.Random(0)
    for _ in range(150):
        content = rng.choice(["", "Sure.", "Looking <tool that up", "Multi\nline  text"])
        calls, parts = [], [content + rng.choice(["", "\n", " \n\n"]) if content else ""]
        for _ in range(rng.randrange(1, 4)):
            args = json.dumps(
                {"x": _random_value(rng), "y": _random_value(rng)},
                ensure_ascii=rng.random() < 0.5,
                indent=rng.choice([None, 2]),
                separators=rng.choice([None, (",", ":")]),
            )
            name = rng.choice(["f", "get_weather", "naïve"])
            calls.append((name, args))
            parts.append(call(json.dumps({"name": name}, ensure_ascii=False)[:-1] + ', "arguments": ' + args + "}"))
            parts.append(rng.choice(["", "\n", " junk "]))
        output = "".join(parts)
        cuts = sorted(rng.sample(range(len(output) + 1), min(6, len(output) + 1)))
        pieces = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])]
        events = stream(pieces)
        check_event_order(events)
        assert summary(*collect(events)) == (content, calls)
        assert all(json.loads(args) is not None for _, args in calls)


# Real text arrival: the tiny checkpoint's byte-level tokenizer, one token at a time.


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tool_tokenizer")
    write_tokenizer_files(directory)
    return AutoTokenizer.from_pretrained(directory)


def detokenized(tokenizer, text: str) -> list[str]:
    """`text` as the chat handler sees it arrive: encoded, then decoded one token id at a time."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(TokenBytes(tokenizer), skip_special_tokens=True)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    return pieces


@pytest.mark.parametrize("output,content,calls", ALL)
def test_token_by_token_through_the_detokenizer(tokenizer, output, content, calls):
    pieces = detokenized(tokenizer, output)
    if "<tool_call>" in output:
        assert "<tool_call>" in pieces, "the marker arrives as one added token"
    if len(output.encode()) > len(output):
        assert "" in pieces[:-1], "a multi-byte character arrived over several tokens"
    events = stream(pieces)
    check_event_order(events)
    assert summary(*collect(events)) == (content, calls)
