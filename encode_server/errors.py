"""The error codes an encode service puts on the wire (EncodeError.code), and the exception
that carries one through the service until it becomes an EncodeError.

Codes are few and stable so the language service can map them to client responses; messages
are written for the language service's client (what went wrong and what to send instead) and
never carry server internals (stack traces, host paths the client did not send, peer names).
"""

from __future__ import annotations

from typing import Literal

from encode_server.images import ImageError

ErrorCode = Literal[
    "invalid_image",
    "unsupported_format",
    "image_too_large",
    "unsupported_aspect_ratio",
    "fetch_failed",
    "forbidden_source",
    "invalid_request",
    "overloaded",
    "internal",
]

# The documented set: code -> when it is sent. A client-facing service shows 4xx for all but
# `overloaded` (retry later or on another encoder) and `internal` (a bug or a device failure).
ERROR_CODES: dict[str, str] = {
    "invalid_image": "the bytes are not a decodable image (corrupt, truncated, empty)",
    "unsupported_format": "a real image in a format the service does not accept",
    "image_too_large": "too many bytes, or too many pixels to decode",
    "unsupported_aspect_ratio": "longer side more than 200x the shorter (Qwen's smart_resize refuses)",
    "fetch_failed": "the URL or file could not be read (network error, HTTP status, timeout, missing)",
    "forbidden_source": "the URL or path points where this service may not read",
    "invalid_request": "the job itself is malformed (bad options, unknown source kind)",
    "overloaded": "the service has too many jobs in flight; retry later or elsewhere",
    "internal": "the service failed; details are in its log",
}


class EncodeFailure(Exception):
    """A job cannot be answered with embeddings; becomes an EncodeError on the wire."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def from_image_error(error: ImageError) -> EncodeFailure:
    """Decoding and preprocessing errors keep their code, except that settings out of range
    are the request's fault, so they go out as invalid_request."""
    code = "invalid_request" if error.code == "invalid_settings" else error.code
    return EncodeFailure(code, error.message)
