"""Typed messages that cross the wire between the language and encode services.

Each class names its wire type (`WIRE_TYPE`) and the wire kind of each field (`WIRE_FIELDS`).
The kinds are checked by transfer.codec on both encode and decode, so a field added here without
a kind cannot be sent. Tensor and byte-string fields travel as raw frames beside the msgpack
header; everything else lives in the header.

Change a field, its meaning or a limit in a way an old peer would misread -> bump
PROTOCOL_VERSION. Peers with different versions refuse each other's messages (with a logged
reason) instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Union

import torch

PROTOCOL_VERSION: int = 4  # 2: DATA names its write fence (cuda_ipc device fences); 3: job and ping tokens;
# 4: EncodeResult.content_key

# Option values an EncodeJob may carry (min_pixels, max_pixels, ...): plain scalars only, so a
# job never smuggles structure the encoder would have to interpret.
OptionValue = Union[bool, int, float, str]


@dataclass
class EncodeJob:
    """Language service -> encode service: encode one image and push the result to `reply_to`."""

    request_id: str
    image_key: str  # the language service's key for this image (its prefix-cache identity), echoed back;
    # the encoder keys its own cache by the bytes it reads and the settings it applies
    source: bytes | str  # raw image bytes (sent as a raw frame), or a URL / local path string
    reply_to: str  # transport address of the process that runs the language model
    options: dict[str, OptionValue] = field(default_factory=dict)  # min_pixels, max_pixels, ...
    token: str = ""  # the shared secret of encoders that require one (encode settings' job_token)

    WIRE_TYPE: ClassVar[str] = "encode_job"
    WIRE_FIELDS: ClassVar[dict[str, str]] = {
        "request_id": "id",
        "image_key": "id",
        "source": "source",
        "reply_to": "address",
        "options": "options",
        "token": "text",
    }


@dataclass
class EncodeResult:
    """Encode service -> language model process: the vision tower's output for one image.

    embeddings is [N, H*(1+k)]: columns [0:H] are the image embedding, then k deepstack levels
    of H columns each. N = t*h*w / merge**2 for grid_thw = (t, h, w) in patches.
    """

    request_id: str
    image_key: str
    grid_thw: tuple[int, int, int]
    embeddings: torch.Tensor  # [N, H*(1+k)] bf16 / fp16 / fp32
    # transfer.content_key of the bytes the encoder read (a URL's content, not its text); the
    # language side's prefix-cache identity of the image. Senders that key nothing keep the default.
    content_key: str = "unkeyed"

    WIRE_TYPE: ClassVar[str] = "encode_result"
    WIRE_FIELDS: ClassVar[dict[str, str]] = {
        "request_id": "id",
        "image_key": "id",
        "grid_thw": "grid",
        "embeddings": "matrix",
        "content_key": "id",
    }


@dataclass
class EncodeError:
    """Encode service -> language model process: the image could not be encoded.

    `code` is machine-readable (e.g. "fetch_failed", "bad_image", "too_large", "internal");
    `message` is for the client and must not leak server internals.
    """

    request_id: str
    image_key: str
    code: str
    message: str

    WIRE_TYPE: ClassVar[str] = "encode_error"
    WIRE_FIELDS: ClassVar[dict[str, str]] = {
        "request_id": "id",
        "image_key": "id",
        "code": "code",
        "message": "text",
    }


@dataclass
class HealthPing:
    """Anyone -> encode service: are you alive and how busy are you? Answered at `reply_to`."""

    reply_to: str
    seq: int
    sent_at: float  # sender's time.monotonic(); echoed back so the sender can measure latency
    token: str = ""  # as EncodeJob.token: a pong is a connection to reply_to too

    WIRE_TYPE: ClassVar[str] = "health_ping"
    WIRE_FIELDS: ClassVar[dict[str, str]] = {"reply_to": "address", "seq": "count", "sent_at": "time",
                                             "token": "text"}


@dataclass
class HealthPong:
    """Encode service -> pinger: liveness plus the load a least-loaded dispatcher needs."""

    seq: int
    sent_at: float  # copied from the ping
    service_id: str  # stable name of the answering encoder instance
    queued: int  # images waiting for the vision tower
    running: int  # images in the vision forward right now
    ready: bool  # weights loaded and accepting jobs

    WIRE_TYPE: ClassVar[str] = "health_pong"
    WIRE_FIELDS: ClassVar[dict[str, str]] = {
        "seq": "count",
        "sent_at": "time",
        "service_id": "id",
        "queued": "count",
        "running": "count",
        "ready": "flag",
    }


Message = Union[EncodeJob, EncodeResult, EncodeError, HealthPing, HealthPong]

# Wire type name -> class. The codec refuses any type not listed here.
MESSAGE_TYPES: dict[str, type] = {
    cls.WIRE_TYPE: cls for cls in (EncodeJob, EncodeResult, EncodeError, HealthPing, HealthPong)
}

# The codec walks WIRE_FIELDS, so a field without a wire kind would silently stay home.
for _cls in MESSAGE_TYPES.values():
    assert list(_cls.WIRE_FIELDS) == [f.name for f in fields(_cls)], f"{_cls.__name__}.WIRE_FIELDS is incomplete"
