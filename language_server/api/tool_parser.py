"""Qwen's tool calls in the answer text -> OpenAI's `tool_calls`, streamed as the text arrives.

Qwen3 / Qwen3-VL write each call as
`<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>`
(`<tool_call>` and `</tool_call>` are ordinary added tokens, so they survive skip_special_tokens).
`ToolCallParser` is fed the answer's text pieces as the detokenizer makes them and returns events:
`ContentDelta` for text outside calls, and per call a `ToolCallStart` (index, fresh id, name) as
soon as the name is complete, then `ToolCallArguments` fragments as the arguments arrive.
`parse_tool_calls` is the same parser run on the whole text, so a streamed and a whole answer
always agree. With a reasoning model, feed only the content the reasoning parser lets through:
a call written inside the reasoning is not a call.

Decisions (vLLM's hermes parser, which serves Qwen, decides the same unless noted):
- Content is the text before the first call. Text between and after calls is dropped, and so is
  the whitespace just before a call (vLLM keeps it; Qwen's template puts a newline there, so a
  client that sends the message back would get two). So content is held back while it ends in
  whitespace, not only while it may be a partial `<tool_call>`. No call markup reaches the content.
- The call body is checked as it arrives, as strictly as `json.loads`, by a character scanner that
  knows when it is inside a JSON string: `}` or `</tool_call>` inside a string is just text, and
  the arguments end exactly where their JSON value closes.
- Arguments are the JSON text of the "arguments" value exactly as the model wrote it (an object
  or array streams as it arrives; a scalar comes whole when it ends). Two exceptions, for models
  that write them: a JSON string value is taken as the arguments text itself (double-encoded
  arguments, which Qwen's template also renders raw; vLLM quotes them again), and null or a
  missing "arguments" is "{}" (vLLM gives up on the whole output).
  vLLM re-serializes with json.dumps when not streaming and streams the raw text, so its two
  paths can differ in whitespace; here they cannot.
- A call that goes wrong before its name is complete (not JSON, not an object, no string name,
  or the output ends first) was not a call: its text, from `<tool_call>` on, is content (vLLM
  returns the whole output as content when any call fails to parse), and scanning resumes at the
  first offending character, so a real call after it is still found. Once the name has gone out the
  call cannot be taken back: a body that breaks off later (cut by max_tokens, or invalid JSON
  inside the arguments) keeps the arguments streamed so far, as OpenAI's are when
  finish_reason is "length", and the rest of its text is dropped.
- A body that is a complete object is a call even without its `</tool_call>` (the output may
  stop right after the object).
- `parallel=False` (`parallel_tool_calls: false`): only the first call; everything after it is dropped.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from language_server.api.stop import partial_marker

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_WHITESPACE = " \t\n\r"  # JSON's whitespace: anything else between tokens is an error
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}  # after their first letter
_CLOSER = {"{": "}", "[": "]"}


def new_tool_call_id() -> str:
    """OpenAI's shape, `call_` and 24 random characters; unique per call, not per request."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call's first streamed delta: OpenAI's clients key later fragments on `index`."""

    index: int
    id: str
    name: str
    type: str = "function"

    def to_delta(self) -> dict:
        return {"index": self.index, "id": self.id, "type": self.type, "function": {"name": self.name, "arguments": ""}}


@dataclass(frozen=True)
class ToolCallArguments:
    """The next piece of call `index`'s arguments text; the pieces concatenate to the whole."""

    index: int
    arguments: str

    def to_delta(self) -> dict:
        return {"index": self.index, "function": {"arguments": self.arguments}}


ToolEvent = ContentDelta | ToolCallStart | ToolCallArguments


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> dict:
        """As a chat completion message's `tool_calls` entry."""
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


def _number_step(state: str, ch: str) -> str | None:
    """JSON's number grammar as a small automaton: the state after `ch`, or None if `ch` cannot
    continue the number (which then ended before it, if `state` is one of _NUMBER_ENDS)."""
    digit = "0" <= ch <= "9"
    if state == "-":
        return "0" if ch == "0" else "int" if digit else None
    if state in ("0", "int", "frac"):
        if digit and state != "0":
            return state
        if ch == "." and state != "frac":
            return "."
        return "e" if ch in "eE" else None
    if state == ".":
        return "frac" if digit else None
    if state == "e":
        return "sign" if ch in "+-" else "exp" if digit else None
    return "exp" if digit else None  # after the exponent's sign, or in its digits


_NUMBER_ENDS = frozenset({"0", "int", "frac", "exp"})


class _CallBody:
    """Scans one call body, `{"name": ..., "arguments": ...}`, a character at a time.

    It validates as strictly as json.loads (so arguments that pass it always load), follows the
    outer object's members to find the name and the arguments value, and stops at the character
    that closes the object (`done`) or at the first one that cannot be JSON (`failed`).
    """

    def __init__(self) -> None:
        self.name: str | None = None
        self.done = False
        self.failed = False
        self._stack: list[list[str]] = []  # open containers: [opening bracket, what comes next]
        self._lexeme: str | None = None  # inside a "string", "number" or "literal"
        self._is_key = False  # the string being read is an object key
        self._escape = 0  # in a string: 0 plain, -1 just after a backslash, n > 0 hex digits due
        self._number = ""
        self._literal = ""  # letters of true/false/null still due
        self._key: list[str] | None = None  # characters of the outer object's current key
        self._member: str | None = None  # the outer object's key whose value is being read
        self._seen: set[str] = set()
        self._sink: list[str] | None = None  # where the characters being read are kept, if anywhere
        self._value: list[str] = []  # the name's or a scalar argument's JSON text
        self._arguments: list[str] = []  # arguments text not yet taken
        self._has_arguments = False

    def feed(self, text: str) -> int:
        """Read `text` until the object closes or turns out not to be JSON; return how many
        characters belong to the body (the rest, starting at the offending one, does not)."""
        for i, ch in enumerate(text):
            if not self._push(ch):
                self.failed = True
                return i
            if self.done:
                return i + 1
        return len(text)

    def take_arguments(self) -> str:
        """The arguments text read since the last call."""
        text = "".join(self._arguments)
        self._arguments.clear()
        return text

    def _push(self, ch: str) -> bool:
        if self._lexeme == "string":
            return self._string_char(ch)
        if self._lexeme == "literal":
            if ch != self._literal[0]:
                return False
            self._keep(ch)
            self._literal = self._literal[1:]
            if not self._literal:
                self._lexeme = None
                return self._value_end()
            return True
        if self._lexeme == "number":
            state = _number_step(self._number, ch)
            if state is not None:
                self._keep(ch)
                self._number = state
                return True
            # A number has no closing character: it ends at the first one that cannot continue it.
            self._lexeme = None
            if self._number not in _NUMBER_ENDS or not self._value_end():
                return False
        return self._structural(ch)

    def _keep(self, ch: str) -> None:
        if self._sink is not None:
            self._sink.append(ch)

    def _string_char(self, ch: str) -> bool:
        if self._escape > 0:
            if ch not in _HEX:
                return False
            self._escape -= 1
        elif self._escape == -1:
            if ch == "u":
                self._escape = 4
            elif ch in '"\\/bfnrt':
                self._escape = 0
            else:
                return False
        elif ch == "\\":
            self._escape = -1
        elif ch == '"':
            self._keep(ch)
            self._lexeme = None
            return self._key_end() if self._is_key else self._value_end()
        elif ch < " ":  # json.loads refuses raw control characters (a newline too) in strings
            return False
        self._keep(ch)
        return True

    def _structural(self, ch: str) -> bool:
        """A character between tokens: whitespace, punctuation, or the start of a value."""
        if ch in _WHITESPACE:
            self._keep(ch)  # inside the arguments it is part of the text as written
            return True
        if not self._stack:
            if ch != "{":
                return False
            self._stack.append(["{", "key_or_end"])
            return True
        frame = self._stack[-1]
        opener, expect = frame
        if ch == _CLOSER[opener] and expect in ("key_or_end", "value_or_end", "comma_or_end"):
            return self._close(ch)
        if expect == "comma_or_end":
            if ch != ",":
                return False
            self._keep(ch)
            frame[1] = "key" if opener == "{" else "value"
            return True
        if expect in ("key_or_end", "key"):
            if ch != '"':
                return False
            if len(self._stack) == 1:
                self._sink = self._key = []
            self._keep(ch)
            self._lexeme, self._is_key, self._escape = "string", True, 0
            frame[1] = "colon"
            return True
        if expect == "colon":
            if ch != ":":
                return False
            self._keep(ch)
            frame[1] = "value"
            return True
        return self._value_start(ch)

    def _value_start(self, ch: str) -> bool:
        if len(self._stack) == 1:  # a member of the outer object: choose where its text goes
            if self._member == "arguments" and ch in "{[":
                self._sink = self._arguments  # streams as it arrives
            elif self._member in ("name", "arguments"):
                self._value = []
                self._sink = self._value
            else:
                self._sink = None  # other members are checked, then ignored
        if ch in "{[":
            self._keep(ch)
            self._stack.append([ch, "key_or_end" if ch == "{" else "value_or_end"])
            return True
        if ch == '"':
            self._lexeme, self._is_key, self._escape = "string", False, 0
        elif ch == "-" or "0" <= ch <= "9":
            self._lexeme, self._number = "number", "-" if ch == "-" else "0" if ch == "0" else "int"
        elif ch in _LITERALS:
            self._lexeme, self._literal = "literal", _LITERALS[ch]
        else:
            return False
        self._keep(ch)
        return True

    def _close(self, ch: str) -> bool:
        self._keep(ch)
        self._stack.pop()
        if self._stack:
            return self._value_end()
        self.done = True
        if self.name is None:
            return False
        if not self._has_arguments:
            self._arguments.append("{}")
        return True

    def _key_end(self) -> bool:
        if len(self._stack) != 1:
            return True
        key = json.loads("".join(self._key or ()))
        self._sink = self._key = None
        if key in self._seen and key in ("name", "arguments"):
            return False  # which one would be meant?
        self._seen.add(key)
        self._member = key
        return True

    def _value_end(self) -> bool:
        """A value closed: its container expects a comma or its end; an outer member is complete."""
        self._stack[-1][1] = "comma_or_end"
        if len(self._stack) != 1:
            return True
        member, self._member, self._sink = self._member, None, None
        raw, self._value = "".join(self._value), []
        if member == "name":
            name = json.loads(raw)
            if not isinstance(name, str) or not name:
                return False
            self.name = name
        elif member == "arguments":
            self._has_arguments = True
            if raw:  # a scalar: it was held back, not streamed
                value = json.loads(raw)
                self._arguments.append("{}" if value is None else value if isinstance(value, str) else raw)
        return True


class ToolCallParser:
    """Splits the streamed answer text into content and tool calls (see the module docstring).

    feed(piece) -> events for the text that is now certain; finish() -> the rest at the end.
    Content is held back only while it could still be the start of `<tool_call>` (or is
    whitespace that a call right after it would drop).
    """

    def __init__(self, parallel: bool = True, new_id: Callable[[], str] = new_tool_call_id) -> None:
        self._parallel = parallel
        self._new_id = new_id
        self._held = ""  # outside calls: a tail that may still be whitespace before a call or part of a marker
        self._body: _CallBody | None = None  # inside a call
        self._raw = ""  # the current call's text while its name is unknown: content if it fails
        self._gap = ""  # the whitespace dropped before the current call: content if it fails
        self._index: int | None = None  # the current call's index once its name went out
        self._calls = 0

    def feed(self, piece: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while piece:
            piece = self._feed_text(piece, events) if self._body is None else self._feed_call(piece, events)
        return events

    def finish(self) -> list[ToolEvent]:
        """The end of the output: held text is content after all; a call that is still open keeps
        what it streamed, or, if its name never completed, was text."""
        events: list[ToolEvent] = []
        if self._body is None:
            self._content(self._held, events)
        elif self._index is None:
            self._content(self._gap + self._raw, events)
        self._held, self._body = "", None
        return events

    def _feed_text(self, piece: str, events: list[ToolEvent]) -> str:
        """Outside calls: content up to the next `<tool_call>`; returns the text after it."""
        if self._calls and not self._parallel:
            return ""
        text = self._held + piece
        start = text.find(CALL_START)
        if start < 0:
            keep = partial_marker(text, CALL_START)
            before = text[: len(text) - keep]
            safe = before.rstrip()
            self._content(safe, events)
            self._held = text[len(safe) :]
            return ""
        before = text[:start]
        safe = before.rstrip()
        self._content(safe, events)
        self._held, self._gap, self._raw = "", before[len(safe) :], CALL_START
        self._body, self._index = _CallBody(), None
        return text[start + len(CALL_START) :]

    def _feed_call(self, piece: str, events: list[ToolEvent]) -> str:
        """Inside a call: name and arguments as they complete; returns the text after the call."""
        body = self._body
        assert body is not None
        used = body.feed(piece)
        if self._index is None:
            self._raw += piece[:used]
            if body.name is not None:  # it completed inside this piece: the call is real
                self._index, self._calls = self._calls, self._calls + 1
                events.append(ToolCallStart(self._index, self._new_id(), body.name))
        if self._index is not None:
            arguments = body.take_arguments()
            if arguments:
                events.append(ToolCallArguments(self._index, arguments))
        if not (body.done or body.failed):
            return ""
        if self._index is None:  # not a call after all: its text is content, read on from where it broke
            text = self._gap + self._raw
            safe = text.rstrip()  # whitespace at its end may still be the gap before a real call
            self._content(safe, events)
            self._held = text[len(safe) :]
        self._body = None
        return piece[used:]

    def _content(self, text: str, events: list[ToolEvent]) -> None:
        if not text or self._calls:  # after the first call, text is dropped
            return
        if events and isinstance(events[-1], ContentDelta):
            events[-1] = ContentDelta(events[-1].text + text)
        else:
            events.append(ContentDelta(text))


def collect(events: list[ToolEvent]) -> tuple[str, list[ToolCall]]:
    """Streamed events joined the way a client joins them: the content, and each call whole."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls.append(ToolCall(event.id, event.name, "", event.type))
        else:
            calls[event.index].arguments += event.arguments
    return "".join(content), calls


def parse_tool_calls(
    text: str, parallel: bool = True, new_id: Callable[[], str] = new_tool_call_id
) -> tuple[str, list[ToolCall]]:
    """A whole answer -> (content, calls): the streaming parser fed the text at once, so the two agree."""
    parser = ToolCallParser(parallel, new_id)
    return collect(parser.feed(text) + parser.finish())
