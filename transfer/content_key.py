"""The one content key of an image: what both services call the same image.

The language service keys its prefix cache with it (an image's tokens count as (key, index)),
and the encode service keys its result cache with it, so an image has one identity on both
sides. It covers the image bytes and a request's preprocessing options (min_pixels /
max_pixels), the only inputs of the vision output that vary per request: patch size, merge
size and normalisation belong to the checkpoint, which both services load.

For bytes the language service holds (data URLs) it computes the key itself; for a URL or a
local path only the encoder sees the bytes, so it computes the key from what it read and
reports it in EncodeResult.content_key. Changed content at one URL therefore gets a new key.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping

# Bump when decoding or preprocessing changes its output for the same bytes and options, so
# results (and KV blocks computed from them) made by the old code are never reused for the new.
KEY_VERSION = "splitvl-image-v2"


def content_key(data: bytes | memoryview, options: Mapping[str, bool | int | float | str]) -> str:
    """sha256 hex over the key version, the options (canonical JSON) and the bytes. The options
    are the job's as sent (not the encoder's resolved settings), so both sides can compute it."""
    header = json.dumps({"version": KEY_VERSION, "options": dict(options)}, sort_keys=True)
    digest = hashlib.sha256(header.encode())
    digest.update(b"\0")  # the JSON header never contains NUL, so header and bytes cannot blur
    digest.update(data)
    return digest.hexdigest()


def is_content_key(text: str) -> bool:
    """Does `text` look like a key content_key made (not a placeholder a peer sent)?"""
    return len(text) == 64 and all(c in string.hexdigits for c in text)
