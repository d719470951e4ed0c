"""The HTTP process's text handling, directly: incremental detokenization and stop strings,
with the tiny checkpoint's byte-level tokenizer and multi-byte characters."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from language_server.api.detokenizer import IncrementalDetokenizer, TokenBytes
from language_server.api.stop import StopMatcher

MULTI_BYTE = "héllo wörld 你好，世界 🙂 ok"


@pytest.fixture(scope="module")
def tokenizer(vl_ckpt):
    return AutoTokenizer.from_pretrained(vl_ckpt)


@pytest.fixture(scope="module")
def token_bytes(tokenizer):
    return TokenBytes(tokenizer)


def stream(token_bytes, ids, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(token_bytes, skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_detokenizer_matches_decode_on_random_ids(tokenizer, token_bytes):
    # Random ids make partial and invalid UTF-8 sequences and interleave special tokens.
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert "".join(stream(token_bytes, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_detokenizer_never_emits_half_a_character(tokenizer, token_bytes):
    ids = tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    pieces = stream(token_bytes, ids)
    assert len(ids) > len(MULTI_BYTE.encode()) // 2, "the tiny BPE should split multi-byte characters"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTI_BYTE
    # Some token ended mid-character, so its delta was held back (empty) until the next one.
    assert "" in pieces[:-1]


def test_token_bytes_and_text(tokenizer, token_bytes):
    ids = tokenizer("你", add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes(i) for i in ids) == "你".encode()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes(im_end) == b"<|im_end|>" and im_end in token_bytes.special_ids
    partial = [i for i in ids if len(token_bytes(i)) < 3]
    assert partial and all(token_bytes.text(i).startswith("\\x") for i in partial)


def run_stops(deltas: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = ""
    for delta in deltas:
        out += matcher.push(delta)
        if matcher.stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize(
    "text,stops,expected,stopped",
    [
        ("abc STOP def", ["STOP"], "abc ", True),
        ("abc STOP def", ["ST", "abc"], "", True),  # the earliest match wins
        ("say 你好世界 bye", ["好世"], "say 你", True),
        ("xxSTOxSTOP", ["STOP"], "xxSTOx", True),  # a failed partial match is text after all
        ("no stop here ST", ["STOP"], "no stop here ST", False),  # held tail released at the end
        ("aaab", ["aab"], "a", True),  # overlapping partial matches
    ],
)
def test_stop_strings_across_every_split(text, stops, expected, stopped):
    # All ways of cutting the text into two or three deltas, plus one character at a time.
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    splits += [[text[:i], text[i:j], text[j:]] for i in range(len(text)) for j in range(i, len(text) + 1)]
    splits.append(list(text))
    for deltas in splits:
        assert run_stops(deltas, stops) == (expected, stopped), deltas


def test_stop_string_over_token_boundaries_with_multi_byte_tokens(tokenizer, token_bytes):
    text = "前言：你好，世界！后记"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = stream(token_bytes, ids)
    assert run_stops(deltas, ["，世界！"]) == ("前言：你好", True)
    assert run_stops(deltas, ["世界？"]) == (text, False)
