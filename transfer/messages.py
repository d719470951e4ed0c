"""Typed messages that cross the wire between the language and encode services.

Each class names its wire type (`WIRE_TYPE`); transfer.codec derives each field's wire kind from
its annotation: torch.Tensor (a 2-D tensor, a raw frame), bytes | str (an image source: bytes as
a raw frame, a URL or path in the header), tuple[int, int, int] (a grid), dict[str, OptionValue]
(a small map of plain scalars), int / float / bool (a count / a finite number / a flag), and
Annotated[str, Text(...)] for strings: a bare str is refused, as an id, an address and a client
message need different limits.

Change a field, its meaning or a limit in a way an old peer would misread -> bump
PROTOCOL_VERSION. Peers with different versions refuse each other's messages (with a logged
reason) instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import torch

PROTOCOL_VERSION: int = 4  # 3: job and ping tokens; 4: cuda_ipc control messages simplified, EncodeResult.content_key


@dataclass(frozen=True)
class Text:
    """A string field's limits: at most `max_len` characters, empty only if `allow_empty`."""

    max_len: int
    allow_empty: bool = False


Id = Annotated[str, Text(256)]
Address = Annotated[str, Text(1024)]
Code = Annotated[str, Text(64)]
Note = Annotated[str, Text(4096, allow_empty=True)]  # free text for people (a client message, a token)

# Option values an EncodeJob may carry (min_pixels, max_pixels, ...): plain scalars only, so a
# job never smuggles structure the encoder would have to interpret.
OptionValue = bool | int | float | str


@dataclass
class EncodeJob:
    """Language service -> encode service: encode one image and push the result to `reply_to`."""

    request_id: Id
    image_key: Id  # echoed back: the content key of bytes the language service sent, else a placeholder
    # (a URL or path is keyed by the encoder, from what it reads: EncodeResult.content_key)
    source: bytes | str  # raw image bytes (sent as a raw frame), or a URL / local path string
    reply_to: Address  # transport address of the process that runs the language model
    options: dict[str, OptionValue] = field(default_factory=dict)  # min_pixels, max_pixels, ...
    token: Note = ""  # the shared secret of encoders that require one (encode settings' job_token)

    WIRE_TYPE: ClassVar[str] = "encode_job"


@dataclass
class EncodeResult:
    """Encode service -> language model process: the vision tower's output for one image.

    embeddings is [N, H*(1+k)]: columns [0:H] are the image embedding, then k deepstack levels
    of H columns each. N = t*h*w / merge**2 for grid_thw = (t, h, w) in patches.
    """

    request_id: Id
    image_key: Id
    grid_thw: tuple[int, int, int]
    embeddings: torch.Tensor  # [N, H*(1+k)] bf16 / fp16 / fp32
    # transfer.content_key of the bytes the encoder read (a URL's content, not its text); the
    # language side's prefix-cache identity of the image. Empty: the sender keys nothing.
    content_key: Annotated[str, Text(64, allow_empty=True)] = ""

    WIRE_TYPE: ClassVar[str] = "encode_result"


@dataclass
class EncodeError:
    """Encode service -> language model process: the image could not be encoded.

    `code` is machine-readable (e.g. "fetch_failed", "bad_image", "too_large", "internal");
    `message` is for the client and must not leak server internals.
    """

    request_id: Id
    image_key: Id
    code: Code
    message: Note

    WIRE_TYPE: ClassVar[str] = "encode_error"


@dataclass
class HealthPing:
    """Anyone -> encode service: are you alive and how busy are you? Answered at `reply_to`."""

    reply_to: Address
    seq: int
    sent_at: float  # sender's time.monotonic(); echoed back so the sender can measure latency
    token: Note = ""  # as EncodeJob.token: a pong is a connection to reply_to too

    WIRE_TYPE: ClassVar[str] = "health_ping"


@dataclass
class HealthPong:
    """Encode service -> pinger: liveness plus the load a least-loaded dispatcher needs."""

    seq: int
    sent_at: float  # copied from the ping
    service_id: Id  # stable name of the answering encoder instance
    queued: int  # images waiting for the vision tower
    running: int  # images in the vision forward right now
    ready: bool  # weights loaded and accepting jobs

    WIRE_TYPE: ClassVar[str] = "health_pong"


Message = EncodeJob | EncodeResult | EncodeError | HealthPing | HealthPong

# Wire type name -> class. The codec refuses any type not listed here, and checks at import that
# every field of each has a wire kind.
MESSAGE_TYPES: dict[str, type] = {
    cls.WIRE_TYPE: cls for cls in (EncodeJob, EncodeResult, EncodeError, HealthPing, HealthPong)
}
