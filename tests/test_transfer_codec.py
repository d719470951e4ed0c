"""Codec: bit-exact round trips, zero-copy where safe, and every malformed input rejected."""

from __future__ import annotations

import pathlib
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import msgpack
import pytest
import torch

from transfer import codec
from transfer.codec import DEFAULT_LIMITS, Limits, ProtocolError, decode_message, encode_message
from transfer.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    EncodeError,
    EncodeJob,
    EncodeResult,
    HealthPing,
    HealthPong,
    Id,
    Text,
)

FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Every bit pattern is fair game (NaNs with payloads, infs, -0, subnormals): the wire must
    move bits, not values."""
    g = torch.Generator().manual_seed(seed)
    ints = INT_VIEW[dtype]
    info = torch.iinfo(ints)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=ints).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))
    )


def result(embeddings: torch.Tensor) -> EncodeResult:
    return EncodeResult("req-1", "sha256:ab12", (1, 32, 32), embeddings)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(0, 8192), (1, 1), (3, 5), (1024, 8192)])
def test_result_round_trip_is_bit_exact(dtype: torch.dtype, rows: int, cols: int) -> None:
    emb = random_bits((rows, cols), dtype)
    frames = encode_message(result(emb))
    assert len(frames) == 2
    back = decode_message(frames)
    assert isinstance(back, EncodeResult)
    assert (back.request_id, back.image_key, back.grid_thw) == ("req-1", "sha256:ab12", (1, 32, 32))
    assert same_bits(back.embeddings, emb)


def test_64_mib_tensor_round_trips_through_bytes() -> None:
    emb = random_bits((4096, 8192), torch.bfloat16, seed=1)  # 64 MiB
    assert emb.numel() * emb.element_size() == 64 << 20
    frames = [bytes(f) for f in encode_message(result(emb))]
    assert same_bits(decode_message(frames).embeddings, emb)


def test_send_side_is_zero_copy() -> None:
    emb = random_bits((64, 128), torch.float32)
    frame = encode_message(result(emb))[1]
    assert isinstance(frame, memoryview)
    emb[0, 0] = 42.0  # the frame is a view of the tensor's own memory
    assert torch.frombuffer(bytearray(frame[:4]), dtype=torch.float32).item() == 42.0


def test_receive_side_is_zero_copy_for_writable_aligned_frames() -> None:
    emb = random_bits((64, 128), torch.float16)
    frames = [frame if i == 0 else bytearray(frame) for i, frame in enumerate(encode_message(result(emb)))]
    back = decode_message(frames)
    before = back.embeddings.clone()
    frames[1][0:2] = b"\x00\x3c"  # fp16 1.0 written into the frame shows through the tensor
    assert back.embeddings.view(-1)[0].item() == 1.0
    assert not torch.equal(before, back.embeddings)


def test_read_only_frames_are_copied_without_warning() -> None:
    emb = random_bits((16, 16), torch.bfloat16)
    frames = [bytes(f) for f in encode_message(result(emb))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a non-writable buffer
        back = decode_message(frames)
    back.embeddings.zero_()  # writable, and writing must not touch the immutable bytes
    assert same_bits(decode_message(frames).embeddings, emb)


def test_misaligned_frame_is_realigned() -> None:
    emb = random_bits((7, 9), torch.float32)
    payload = bytes(encode_message(result(emb))[1])
    shifted = memoryview(bytearray(b"x" + payload))[1:]  # data starts at an odd address
    back = decode_message([encode_message(result(emb))[0], shifted])
    assert back.embeddings.data_ptr() % 4 == 0
    assert same_bits(back.embeddings, emb)


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    base = random_bits((16, 8), torch.float32)
    emb = base.t()  # [8, 16] non-contiguous view
    assert same_bits(decode_message(encode_message(result(emb))).embeddings, emb.contiguous())


@pytest.mark.parametrize(
    "msg",
    [
        EncodeJob("r", "k", b"\x89PNG...", "tcp://10.0.0.1:5555", {"min_pixels": 3136, "max_pixels": 1 << 20}),
        EncodeJob("r", "k", "https://example.com/cat.png", "ipc:///tmp/engine.sock", {"fast": True, "f": 0.5, "s": ""}),
        EncodeError("r", "k", "bad_image", "cannot identify image file"),
        HealthPing("tcp://127.0.0.1:6000", 7, 123.25),
        HealthPong(7, 123.25, "encoder-0", 3, 1, True),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_type_round_trips(msg) -> None:
    assert decode_message(encode_message(msg)) == msg
    assert decode_message([bytes(f) for f in encode_message(msg)]) == msg


@dataclass
class _TwoTensors:
    """A test-only message type: the codec is generic over the annotations and frame count."""

    request_id: Id
    first: torch.Tensor
    blob: bytes | str
    second: torch.Tensor

    WIRE_TYPE: ClassVar[str] = "test_two_tensors"


def test_several_tensors_per_message(monkeypatch) -> None:
    monkeypatch.setitem(MESSAGE_TYPES, _TwoTensors.WIRE_TYPE, _TwoTensors)
    a, b = random_bits((5, 3), torch.bfloat16), random_bits((0, 4), torch.float32)
    frames = encode_message(_TwoTensors("r", a, b"\x00\x01\x02", b))
    assert len(frames) == 4
    back = decode_message([bytes(f) for f in frames])
    assert same_bits(back.first, a) and same_bits(back.second, b) and back.blob == b"\x00\x01\x02"


def test_wire_kinds_come_from_the_annotations() -> None:
    assert {name: kind.name for name, kind in codec.wire_fields(EncodeJob).items()} == {
        "request_id": "text",
        "image_key": "text",
        "source": "source",
        "reply_to": "text",
        "options": "options",
        "token": "text",
    }
    assert codec.wire_fields(EncodeJob)["reply_to"].text == Text(1024)
    assert {name: kind.name for name, kind in codec.wire_fields(HealthPong).items()} == {
        "seq": "count",
        "sent_at": "time",
        "service_id": "text",
        "queued": "count",
        "running": "count",
        "ready": "flag",
    }


@dataclass
class _BareString:
    name: str  # no limit: an id, an address and a message need different ones
    WIRE_TYPE: ClassVar[str] = "test_bare_string"


def test_a_field_without_a_wire_kind_cannot_be_sent(monkeypatch) -> None:
    monkeypatch.setitem(MESSAGE_TYPES, _BareString.WIRE_TYPE, _BareString)
    with pytest.raises(TypeError, match="_BareString.name: annotation .* has no wire kind"):
        encode_message(_BareString("x"))


# ---------------------------------------------------------------------------- send-side checks


def test_sender_refuses_bad_messages() -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        encode_message(result(torch.zeros(2, 2, dtype=torch.int64)))
    with pytest.raises(ProtocolError, match="2-D"):
        encode_message(result(torch.zeros(2, 2, 2)))
    with pytest.raises(ProtocolError, match="not a wire message"):
        encode_message({"request_id": "r"})
    with pytest.raises(ProtocolError, match="option .nested."):
        encode_message(EncodeJob("r", "k", b"x", "tcp://a:1", {"nested": {"a": 1}}))
    with pytest.raises(ProtocolError, match="grid_thw"):
        encode_message(EncodeResult("r", "k", (1, 0, 4), torch.zeros(1, 1)))


# ----------------------------------------------------------------------------- rejections


def _good_frames() -> list:
    return [bytes(f) for f in encode_message(result(random_bits((4, 8), torch.bfloat16)))]


def _with_header(**changes) -> list:
    frames = _good_frames()
    header = msgpack.unpackb(frames[0])
    header.update(changes)
    return [msgpack.packb(header)] + frames[1:]


def _with_fields(**changes) -> list:
    frames = _good_frames()
    header = msgpack.unpackb(frames[0])
    header["fields"].update(changes)
    return [msgpack.packb(header)] + frames[1:]


def _with_frame_desc(**changes) -> list:
    frames = _good_frames()
    header = msgpack.unpackb(frames[0])
    header["frames"][0].update(changes)
    return [msgpack.packb(header)] + frames[1:]


BAD_INPUTS = {
    "no frames": ([], "no frames"),
    "garbage header": ([b"\xc1\xff\x00garbage", b""], "not valid msgpack"),
    "truncated header": ([_good_frames()[0][:-3], _good_frames()[1]], "not valid msgpack"),
    "header not a map": ([msgpack.packb([1, 2, 3])], "must be a map"),
    "no version": ([msgpack.packb({"type": "encode_error"})], "no protocol version"),
    "wrong version": (_with_header(v=PROTOCOL_VERSION + 1), "unsupported protocol version"),
    "bool version": (_with_header(v=True), "no protocol version"),
    "unknown type": (_with_header(type="launch_missiles"), "unknown message type"),
    "extra header key": (_with_header(extra=1), "header keys"),
    "truncated frame": (_good_frames()[:1] + [_good_frames()[1][:-1]], "needs 64"),
    "long frame": (_good_frames()[:1] + [_good_frames()[1] + b"\x00\x00"], "needs 64"),
    "missing frame": (_good_frames()[:1], "describes 1 data frames, got 0"),
    "extra frame": (_good_frames() + [b"\x00"], "describes 1 data frames, got 2"),
    "dtype not whitelisted": (_with_frame_desc(dtype="float64"), "not allowed"),
    "dtype object": (_with_frame_desc(dtype="object"), "not allowed"),
    "shape mismatch": (_with_frame_desc(shape=[4, 9]), "needs 72"),
    "negative dim": (_with_frame_desc(shape=[-4, -8]), "outside"),
    "float dim": (_with_frame_desc(shape=[4.0, 8]), "must be an integer"),
    "3-D embeddings": (_with_frame_desc(shape=[1, 4, 8]), "2-D"),
    "too many dims": (_with_frame_desc(shape=[1] * 9), "dims"),
    "frame for header field": (_with_frame_desc(field="request_id"), "cannot travel as a frame"),
    "oversized frame": (_with_frame_desc(shape=[1 << 20, 1 << 20]), "limit"),
    "unknown field": (_with_fields(colour="red"), "header fields"),
    "id wrong type": (_with_fields(request_id=5), "must be a string"),
    "empty id": (_with_fields(request_id=""), "empty"),
    "huge id": (_with_fields(request_id="x" * 10_000), "limit"),
    "bad grid": (_with_fields(grid_thw=[1, 2]), "3 integers"),
    "zero grid": (_with_fields(grid_thw=[1, 0, 2]), "outside"),
    "ext type": (_with_fields(image_key=msgpack.ExtType(5, b"x")), "extension type"),
    "timestamp ext": (_with_fields(image_key=msgpack.Timestamp(1, 0)), "got Timestamp"),
    "invalid utf-8": ([_good_frames()[0].replace(b"req-1", b"r\xff\xfe-1"), _good_frames()[1]], "not valid msgpack"),
}


def _missing_field() -> list:
    frames = _good_frames()
    header = msgpack.unpackb(frames[0])
    del header["fields"]["image_key"]
    return [msgpack.packb(header)] + frames[1:]


BAD_INPUTS["missing field"] = (_missing_field(), "expected")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_input_is_rejected_with_reason(case: str) -> None:
    frames, reason = BAD_INPUTS[case]
    with pytest.raises(ProtocolError) as info:
        decode_message(frames)
    assert reason in info.value.reason


def test_health_fields_are_type_checked() -> None:
    good = [bytes(f) for f in encode_message(HealthPong(1, 2.0, "e", 0, 0, True))]
    header = msgpack.unpackb(good[0])
    for field, value, reason in [
        ("queued", True, "integer"),
        ("ready", 1, "bool"),
        ("sent_at", float("nan"), "finite"),
        ("queued", -1, "outside"),
    ]:
        bad = {**header, "fields": {**header["fields"], field: value}}
        with pytest.raises(ProtocolError, match=reason):
            decode_message([msgpack.packb(bad)])


def test_limits_are_enforced_before_allocation() -> None:
    small = Limits(max_header_bytes=32)
    with pytest.raises(ProtocolError, match="header is"):
        decode_message(_good_frames(), small)
    with pytest.raises(ProtocolError, match="limit 16"):
        decode_message(_good_frames(), Limits(max_frame_bytes=16))
    with pytest.raises(ProtocolError, match="data frames"):
        decode_message([_good_frames()[0]] + [b""] * (DEFAULT_LIMITS.max_frames + 1))


def test_no_pickle_in_transfer() -> None:
    """The wire must never unpickle: no module of transfer/ may use pickle or torch.multiprocessing."""
    banned = re.compile(
        r"^\s*(import|from)\s+(pickle|cloudpickle|dill|torch\.multiprocessing)\b|pickle\.loads|\bmultiprocessing\.reductions",
        re.MULTILINE,
    )
    root = pathlib.Path(codec.__file__).parent
    for path in root.glob("*.py"):
        assert not banned.search(path.read_text()), f"{path.name} uses pickle"
