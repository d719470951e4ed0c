"""Token ids -> text, incrementally, never emitting half a character.

Qwen's tokenizers are byte-level BPE: every ordinary token is a run of raw bytes (spelled with
GPT-2's printable byte alphabet), so one UTF-8 character can span tokens. Feeding those bytes to
an incremental UTF-8 decoder gives exactly what `tokenizer.decode` gives on the whole sequence,
holds back an unfinished character until its last byte arrives, and costs O(1) per token
(re-decoding a growing window would be quadratic on long runs of invalid bytes, which random
or confused models do produce). Truly invalid bytes become U+FFFD, as in `decode`.
"""

from __future__ import annotations

import codecs

from transformers import PreTrainedTokenizerBase


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable char -> the byte it spells. Printable
    Latin-1 bytes stand for themselves; the other 68 bytes map to chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {ch: b for b, ch in chars.items()}


class TokenBytes:
    """The raw bytes each token id stands for (OpenAI's logprobs `bytes`), and which are special."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        decoder = tokenizer.backend_tokenizer.decoder
        if decoder is None or type(decoder).__name__ != "ByteLevel":
            raise ValueError(f"expected a byte-level BPE tokenizer (as Qwen's); this one decodes with {decoder!r}")
        self._tokenizer = tokenizer
        self._byte_of = _byte_alphabet()
        # Added tokens (<|im_end|>, <think>, ...) are stored as their text, not in the byte alphabet.
        self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.special_ids = frozenset(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            if token_id in self._added:
                cached = self._added[token_id].encode("utf-8")
            else:
                token = self._tokenizer.convert_ids_to_tokens(token_id)
                # Ids past the tokenizer's vocabulary (padded embedding rows) have no text.
                cached = bytes(self._byte_of[ch] for ch in token) if token is not None else b""
            self._cache[token_id] = cached
        return cached

    def text(self, token_id: int) -> str:
        """A single token as text for logprobs; a partial UTF-8 sequence shows as escapes."""
        return self(token_id).decode("utf-8", errors="backslashreplace")


class IncrementalDetokenizer:
    def __init__(self, token_bytes: TokenBytes, skip_special_tokens: bool = True) -> None:
        self._bytes = token_bytes
        self._skip = token_bytes.special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text this token completes (often "", while a character is unfinished)."""
        if token_id in self._skip:
            return ""
        return self._decoder.decode(self._bytes(token_id))

    def flush(self) -> str:
        """At the end: whatever unfinished bytes remain, as U+FFFD (as `decode` shows them)."""
        return self._decoder.decode(b"", final=True)
