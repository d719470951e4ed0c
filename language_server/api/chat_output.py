"""One choice's answer text -> OpenAI's message parts: reasoning_content, content, tool_calls.

The text goes through the reasoning parser first (when the model thinks), then its content
through the tool-call parser (when the request has tools), so a call written inside the
reasoning is not a call. The same object serves a stream (deltas as the text arrives) and a
whole answer (the deltas of all its text joined), so the two always agree.
"""

from __future__ import annotations

from language_server.api.reasoning_parser import ReasoningParser
from language_server.api.tool_parser import ContentDelta, ToolCall, ToolCallParser, ToolCallStart, collect


class ChoiceOutput:
    def __init__(self, *, tools: bool, parallel_tool_calls: bool, reasoning: bool, in_reasoning: bool) -> None:
        self._reasoning = ReasoningParser(in_reasoning) if reasoning or in_reasoning else None
        self._tools = ToolCallParser(parallel_tool_calls) if tools else None
        self._events: list = []  # every tool event, to build the whole message
        self._reasoning_text: list[str] = []
        self.called = False  # a tool call went out: finish_reason becomes "tool_calls"

    def feed(self, text: str) -> list[dict]:
        """The chat deltas this text adds (possibly none: a marker may still be completing)."""
        if self._reasoning is None:
            return self._content(text, final=False)
        split = self._reasoning.feed(text)
        return self._split(split.reasoning, split.content, final=False)

    def finish(self) -> list[dict]:
        """The deltas of whatever was held back, at the end of the answer."""
        if self._reasoning is None:
            return self._content("", final=True)
        split = self._reasoning.finish()
        return self._split(split.reasoning, split.content, final=True)

    def message(self) -> dict:
        """The whole message, after every feed and the finish."""
        content, calls = self._joined()
        message: dict = {"role": "assistant", "content": content if content or not calls else None}
        if self._reasoning is not None:
            message["reasoning_content"] = "".join(self._reasoning_text)
        if self._tools is not None:
            message["tool_calls"] = [call.to_openai() for call in calls]
        return message

    def _joined(self) -> tuple[str, list[ToolCall]]:
        if self._tools is None:
            return "".join(e.text for e in self._events), []
        return collect(self._events)

    def _split(self, reasoning: str, content: str, final: bool) -> list[dict]:
        deltas = []
        if reasoning:
            self._reasoning_text.append(reasoning)
            deltas.append({"reasoning_content": reasoning})
        return deltas + self._content(content, final)

    def _content(self, text: str, final: bool) -> list[dict]:
        if self._tools is None:
            if not text:
                return []
            self._events.append(ContentDelta(text))
            return [{"content": text}]
        events = self._tools.feed(text) if text else []
        if final:
            events += self._tools.finish()
        self._events += events
        deltas: list[dict] = []
        for event in events:
            if isinstance(event, ContentDelta):
                deltas.append({"content": event.text})
                continue
            self.called = self.called or isinstance(event, ToolCallStart)
            delta = {"tool_calls": [event.to_delta()]}
            # Fragments of one call in one piece go out as one delta.
            if (
                deltas
                and "tool_calls" in deltas[-1]
                and deltas[-1]["tool_calls"][-1]["index"] == event.index
                and not isinstance(event, ToolCallStart)
            ):
                deltas[-1]["tool_calls"][-1]["function"]["arguments"] += event.arguments
            else:
                deltas.append(delta)
        return deltas
