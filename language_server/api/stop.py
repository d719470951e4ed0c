"""Stop strings matched across token boundaries.

Text arrives in deltas that split anywhere, so a stop string may start in one delta and end in
a later one. The matcher holds back the longest tail of the text that could still be the start
of a stop string; everything before it is safe to show. Any future match must start inside the
held tail, so searching the tail plus the new delta finds every match, each exactly once.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text now safe to show. After a match: the text before it, and `stopped` is set."""
        if not self._stops:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end without a match: the held tail was plain text after all."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        return max(partial_marker(text, stop) for stop in self._stops)


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`: text that may
    be the start of a marker whose rest has not arrived yet (stop strings, <tool_call>, </think>)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
