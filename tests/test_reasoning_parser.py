"""Think blocks: whole answers against hand-written results, the same answers streamed split at
every position, a character at a time, and token by token through the tiny tokenizer and the
incremental detokenizer; the prompt check; and reasoning composed with the tool parser."""

from __future__ import annotations

import pytest

from language_server.api.reasoning_parser import ReasoningParser, parse_reasoning, prompt_ends_in_reasoning
from language_server.api.tool_parser import ToolCallParser, collect
from tests.test_tool_parser import detokenized, tokenizer  # noqa: F401 - a fixture

# (output, starts_in_reasoning, reasoning, content)
CASES = [
    # Qwen3-VL-Thinking: the prompt opened the block; Qwen's newlines around the markers are trimmed.
    ("Let me think.\nStep 2.\n</think>\n\nThe answer is 4.", True, "Let me think.\nStep 2.", "The answer is 4."),
    # Qwen3 hybrid with thinking on: the output opens the block itself.
    ("<think>\nLet me think.\n</think>\n\nThe answer.", False, "Let me think.", "The answer."),
    ("  \n<think>a</think>b", False, "a", "b"),
    # A repeated <think> when the prompt opened the block already is dropped.
    ("<think>\nx\n</think>\n\ny", True, "x", "y"),
    # Not at the start: just text. No block at all: all content.
    ("Plain answer <think>not reasoning</think>", False, "", "Plain answer <think>not reasoning</think>"),
    ("<thin", False, "", "<thin"),
    ("  answer  ", False, "", "  answer  "),
    # Never closed (cut by max_tokens): all reasoning.
    ("Thinking...\nstill going\n", True, "Thinking...\nstill going", ""),
    ("<think>\npartial", False, "partial", ""),
    ("<think>", False, "", ""),
    ("Cut right at </thi", True, "Cut right at </thi", ""),
    # Empty reasoning, a partial end marker inside the reasoning, only newlines trimmed.
    ("</think>\n\nanswer", True, "", "answer"),
    ("a </thin b</think>c", True, "a </thin b", "c"),
    ("\n\n  x \n\n</think>\n\n\n  indented\n", True, "  x ", "  indented\n"),
    ("思考🙂\n</think>\n\n答案 é", True, "思考🙂", "答案 é"),
    ("r</think>", True, "r", ""),
    ("", True, "", ""),
    ("", False, "", ""),
]


def stream(pieces: list[str], starts_in_reasoning: bool) -> tuple[str, str]:
    parser = ReasoningParser(starts_in_reasoning)
    splits = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(s.reasoning for s in splits), "".join(s.content for s in splits)


@pytest.mark.parametrize("output,starts,reasoning,content", CASES)
def test_whole_answer(output, starts, reasoning, content):
    assert parse_reasoning(output, starts) == (reasoning, content)


@pytest.mark.parametrize("output,starts,reasoning,content", CASES)
def test_every_split_point_and_one_char_at_a_time(output, starts, reasoning, content):
    for i in range(len(output) + 1):
        assert stream([output[:i], output[i:]], starts) == (reasoning, content), f"split at {i}"
    assert stream(list(output), starts) == (reasoning, content)


def test_reasoning_streams_at_once_and_holds_back_only_what_the_end_may_trim():
    parser = ReasoningParser(starts_in_reasoning=True)
    steps = [
        ("\n", "", ""),
        ("Hmm", "Hmm", ""),
        (",\n", ",", ""),
        ("ok", "\nok", ""),
        ("\n</th", "", ""),
        ("ink>", "", ""),
        ("\n\n", "", ""),
        ("Yes", "", "Yes"),
        ("\n", "", "\n"),
    ]
    for piece, reasoning, content in steps:
        split = parser.feed(piece)
        assert (split.reasoning, split.content) == (reasoning, content), piece
    assert (parser.finish().reasoning, parser.finish().content) == ("", "")


def test_the_start_waits_only_while_it_may_be_think():
    parser = ReasoningParser(starts_in_reasoning=False)
    assert parser.feed(" <th").content == ""
    assert parser.feed("e").content == " <the"  # not <think>: content from here on
    assert parser.feed("<think>").content == "<think>"


PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.parametrize(
    "prompt,expected",
    [
        (PROMPT + "<|im_start|>assistant\n<think>\n", True),  # Qwen3-VL-Thinking's generation prompt
        (PROMPT + "<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # enable_thinking=False
        (PROMPT + "<|im_start|>assistant\n", False),  # Instruct, or a hybrid model that opens it itself
        (PROMPT + "<|im_start|>assistant\n<think>\nI was thinking", True),  # continuing a final message
        # Only the last assistant turn counts: an old unclosed block, or a <think> a user wrote, does not.
        ("<|im_start|>assistant\n<think>\nold<|im_end|>\n" + PROMPT + "<|im_start|>assistant\n", False),
        ("<|im_start|>user\nWhat does <think> mean?<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n no assistant turn", False),
    ],
)
def test_prompt_ends_in_reasoning(prompt, expected):
    assert prompt_ends_in_reasoning(prompt) is expected


@pytest.mark.parametrize("output,starts,reasoning,content", CASES)
def test_token_by_token_through_the_detokenizer(tokenizer, output, starts, reasoning, content):  # noqa: F811
    pieces = detokenized(tokenizer, output)
    if "</think>" in output:
        assert "</think>" in pieces, "the marker arrives as one added token"
    assert stream(pieces, starts) == (reasoning, content)


# Composed: the reasoning parser's content goes through the tool parser.

COMPOSED = (
    'I could call <tool_call>\n{"name": "fake", "arguments": {}}\n</tool_call> but will not.\n</think>\n\n'
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
COMPOSED_RESULT = (
    'I could call <tool_call>\n{"name": "fake", "arguments": {}}\n</tool_call> but will not.',
    "Checking.",
    [("get_weather", '{"city": "Paris"}')],
)


def composed(pieces: list[str], starts_in_reasoning: bool) -> tuple[str, str, list[tuple[str, str]]]:
    reasoning_parser, tool_parser = ReasoningParser(starts_in_reasoning), ToolCallParser()
    reasoning, events = [], []
    for split in [reasoning_parser.feed(piece) for piece in pieces] + [reasoning_parser.finish()]:
        reasoning.append(split.reasoning)
        events += tool_parser.feed(split.content)
    content, calls = collect(events + tool_parser.finish())
    return "".join(reasoning), content, [(c.name, c.arguments) for c in calls]


def test_a_call_inside_the_reasoning_is_not_a_call():
    for i in range(len(COMPOSED) + 1):
        assert composed([COMPOSED[:i], COMPOSED[i:]], True) == COMPOSED_RESULT, f"split at {i}"
    assert composed(list(COMPOSED), True) == COMPOSED_RESULT
    assert composed(["<think>\n" + COMPOSED], False) == COMPOSED_RESULT


def test_composed_token_by_token(tokenizer):  # noqa: F811
    assert composed(detokenized(tokenizer, COMPOSED), True) == COMPOSED_RESULT
    # An unclosed block swallows everything, the call too.
    unclosed = COMPOSED.replace("</think>", "")
    reasoning, content, calls = composed(detokenized(tokenizer, unclosed), True)
    assert (content, calls) == ("", []) and reasoning.endswith('{"city": "Paris"}}\n</tool_call>')
