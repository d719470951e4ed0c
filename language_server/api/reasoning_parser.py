"""A thinking model's answer -> reasoning_content and content, streamed as the text arrives.

Qwen3's thinking models write `<think>\\n…\\n</think>\\n\\n` before the answer. Qwen3-VL-Thinking's
chat template opens the block in the prompt (its generation prompt ends with `<think>\\n`), so the
output starts inside the reasoning with no `<think>` of its own; Qwen3's hybrid templates with
`enable_thinking=False` close an empty block in the prompt, so the output is plain content.
`prompt_ends_in_reasoning` tells these apart from the rendered prompt, and `ReasoningParser`
splits the output. Pass its content on to the tool parser: a call inside the reasoning is not one.

Decisions, following vLLM's qwen3 reasoning parser unless noted:
- An output opens a think block if it starts with `<think>` (after optional whitespace, which is
  dropped); one that started inside a block drops such a repeated `<think>` too. A `<think>`
  anywhere later is just text.
- `</think>` ends the reasoning; neither marker appears in either part.
- Newlines are trimmed as Qwen's template trims them when it renders a past answer
  (`reasoning.strip('\\n')`, `content.lstrip('\\n')`), so a client that sends the message back
  renders the same prompt. vLLM keeps them ("\\nreasoning\\n" and "\\n\\ncontent"); only newlines
  are trimmed, other whitespace is kept.
- A block that never closes (the output was cut, e.g. by max_tokens) is all reasoning, no content.
- An output that does not start in a block is all content, as is everything after `</think>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from language_server.api.stop import partial_marker

THINK_START, THINK_END = "<think>", "</think>"
ASSISTANT_TURN = "<|im_start|>assistant"


@dataclass
class ReasoningSplit:
    """What one piece of output adds to each part (reasoning always comes before content)."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """feed(piece) -> the reasoning and content now certain; finish() -> the rest at the end.

    Held back: at the start, text that may still turn out to be `<think>`; in the reasoning,
    a tail that may be the start of `</think>` with the newlines before it (which `</think>`
    would trim); after `</think>`, the newlines that open the content.
    """

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "opening"  # -> "reasoning" -> "after_think" -> "content", or "opening" -> "content"
        self._text = ""  # text not yet given out
        self._reasoning_began = False  # some reasoning went out: its leading newlines are trimmed already

    def feed(self, piece: str) -> ReasoningSplit:
        self._text += piece
        return self._advance(final=False)

    def finish(self) -> ReasoningSplit:
        return self._advance(final=True)

    def _advance(self, final: bool) -> ReasoningSplit:
        out = ReasoningSplit()
        while True:
            step = {
                "opening": self._opening,
                "reasoning": self._reasoning,
                "after_think": self._after_think,
                "content": self._content,
            }[self._state]
            if not step(out, final):
                return out

    def _opening(self, out: ReasoningSplit, final: bool) -> bool:
        """Whether the output opens with `<think>`; undecided while it is whitespace and a prefix."""
        rest = self._text.lstrip()
        if rest.startswith(THINK_START):
            self._text, self._state = rest[len(THINK_START) :], "reasoning"
            return True
        if THINK_START.startswith(rest) and not final:
            return False
        self._state = "reasoning" if self._starts_in_reasoning else "content"
        return True

    def _reasoning(self, out: ReasoningSplit, final: bool) -> bool:
        text = self._text if self._reasoning_began else self._text.lstrip("\n")
        end = text.find(THINK_END)
        if end >= 0:
            out.reasoning += text[:end].rstrip("\n")
            self._text, self._state = text[end + len(THINK_END) :], "after_think"
            return True
        if final:  # never closed: all reasoning
            safe, self._text = text.rstrip("\n"), ""
        else:
            body = text[: len(text) - partial_marker(text, THINK_END)]
            safe = body.rstrip("\n")
            self._text = text[len(safe) :]
        out.reasoning += safe
        self._reasoning_began = self._reasoning_began or bool(safe)
        return False

    def _after_think(self, out: ReasoningSplit, final: bool) -> bool:
        self._text = self._text.lstrip("\n")
        if not self._text:
            return False
        self._state = "content"
        return True

    def _content(self, out: ReasoningSplit, final: bool) -> bool:
        out.content += self._text
        self._text = ""
        return False


def parse_reasoning(text: str, starts_in_reasoning: bool) -> tuple[str, str]:
    """A whole answer -> (reasoning, content): the streaming parser fed the text at once, so the two agree."""
    parser = ReasoningParser(starts_in_reasoning)
    first, last = parser.feed(text), parser.finish()
    return first.reasoning + last.reasoning, first.content + last.content


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt leaves the answer inside an open think block: in the last
    assistant turn (the generation prompt, or a final message being continued), a `<think>`
    that no `</think>` follows."""
    _, marker, turn = prompt.rpartition(ASSISTANT_TURN)
    if not marker:
        return False
    return turn.rfind(THINK_START) > turn.rfind(THINK_END)
