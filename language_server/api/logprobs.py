"""Engine logprobs -> OpenAI's two formats (chat's per-token objects, completions' parallel lists)."""

from __future__ import annotations

from language_server.api.detokenizer import TokenBytes
from language_server.protocol import TokenLogprob

# JSON has no -inf; OpenAI-compatible servers report impossible tokens as this floor instead.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _FLOOR)


def chat_logprobs(entries: list[TokenLogprob], token_bytes: TokenBytes, top_n: int) -> list[dict]:
    """The `content` list of a chat choice's `logprobs`."""

    def one(token_id: int, logprob: float) -> dict:
        return {"token": token_bytes.text(token_id), "logprob": _finite(logprob), "bytes": list(token_bytes(token_id))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top[:top_n]]} for e in entries]


class CompletionLogprobs:
    """Accumulates a text completion's `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, token_bytes: TokenBytes, top_n: int, start_offset: int) -> None:
        self._bytes = token_bytes
        self._top_n = top_n
        self._offset = start_offset

    def chunk(self, entries: list[TokenLogprob]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self._bytes.text(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append({self._bytes.text(t): _finite(lp) for t, lp in e.top[: self._top_n]})
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out


def merge_completion_logprobs(chunks: list[dict]) -> dict:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key in merged:
            merged[key].extend(chunk[key])
    return merged
