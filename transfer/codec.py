"""Messages <-> frames: a msgpack header, then one raw frame per tensor or byte string.

    frame 0   msgpack {"v": PROTOCOL_VERSION, "type": "encode_result",
                       "fields": {scalar fields},
                       "frames": [{"field": "embeddings", "dtype": "bfloat16", "shape": [N, D]}]}
    frame i   the raw little-endian bytes of frames[i-1], C order

One generic codec for every message class: each field's wire kind comes from its annotation
(see transfer/messages.py). Tensors are sent zero-copy and received zero-copy where the buffer
allows. No pickle: the header is plain msgpack (no ext types), and tensors are rebuilt from a
dtype whitelist and a shape whose byte size must equal the frame length. Everything a peer sends
is checked before it is used; a bad message raises ProtocolError with the reason, which
receivers log before they drop the message and keep serving.

The layers are public for cuda_ipc, whose tensors travel through GPU memory instead of frames:
split_message / pack_header on the way out, parse_header / assemble on the way in.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import torch

from transfer.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, OptionValue, Text

# The one dtype table: tensors may only carry these; the wire name is the torch name.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
BYTES = "bytes"  # frame "dtype" of a byte-string field (e.g. EncodeJob.source)

SOURCE_TEXT = Text(8192)  # a source given as a URL or a path
OPTION_KEY, OPTION_TEXT, MAX_OPTIONS = Text(64), Text(256, allow_empty=True), 32
MAX_COUNT = (1 << 63) - 1
MAX_GRID = 1 << 20
_HEADER_KEYS = {"v", "type", "fields", "frames"}
_FRAME_KEYS = {"field", "dtype", "shape"}

Buffer = bytes | bytearray | memoryview
Payload = torch.Tensor | bytes


class ProtocolError(ValueError):
    """A message that must not be used. `reason` says why, for the receiver's log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver enforces before allocating or trusting anything."""

    max_header_bytes: int = 64 * 1024
    max_frames: int = 8
    max_ndim: int = 8
    max_dim: int = 1 << 31
    max_frame_bytes: int = 1 << 30  # one [16384, 8192] fp32 result is 512 MiB
    max_message_bytes: int = 1 << 31  # all frames of one message together


DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------ wire kinds of fields


@dataclass(frozen=True)
class Kind:
    """How one field travels: `name` is matrix, source, text, grid, options, count, time or
    flag; `text` holds a text field's limits. Matrices travel as frames, sources as frames when
    they are bytes, everything else in the header."""

    name: str
    text: Text | None = None


_PLAIN_KINDS: dict[Any, Kind] = {
    torch.Tensor: Kind("matrix"),
    bytes | str: Kind("source", SOURCE_TEXT),
    tuple[int, int, int]: Kind("grid"),
    dict[str, OptionValue]: Kind("options"),
    bool: Kind("flag"),
    int: Kind("count"),
    float: Kind("time"),
}


def _kind_of(cls: type, name: str, hint: Any) -> Kind:
    if typing.get_origin(hint) is typing.Annotated:
        base, *meta = typing.get_args(hint)
        texts = [m for m in meta if isinstance(m, Text)]
        if base is str and len(texts) == 1:
            return Kind("text", texts[0])
    elif hint in _PLAIN_KINDS:
        return _PLAIN_KINDS[hint]
    # A bug in messages.py, caught when the class is first used, not a peer's error.
    raise TypeError(
        f"{cls.__name__}.{name}: annotation {hint!r} has no wire kind "
        "(a str field needs Annotated[str, Text(limit)]; see transfer/messages.py)"
    )


@functools.cache
def wire_fields(cls: type) -> dict[str, Kind]:
    """Each field of message class `cls`, in order, with its wire kind (from the annotations)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _kind_of(cls, f.name, hints[f.name]) for f in fields(cls)}


for _cls in MESSAGE_TYPES.values():  # every message type can be sent, or this import fails
    wire_fields(_cls)


@dataclass(frozen=True)
class FrameSpec:
    """What one raw frame must contain: `nbytes` bytes of `dtype` in `shape` (C order)."""

    field: str
    dtype: str  # a DTYPES key, or BYTES
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Header:
    """A validated frame 0: the message class, its header fields and the frames to expect."""

    cls: type
    fields: dict[str, Any]
    frames: list[FrameSpec]


# ---------------------------------------------------------------------------- field checks


def _check_str(name: str, value: Any, text: Text) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"field {name!r} must be a string, got {type(value).__name__}")
    if len(value) == 0 and not text.allow_empty:
        raise ProtocolError(f"field {name!r} is empty")
    if len(value) > text.max_len:
        raise ProtocolError(f"field {name!r} is {len(value)} characters (limit {text.max_len})")
    return value


def _is_int(value: Any) -> bool:  # bool is an int subclass, but a flag where a count belongs is a bug
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise ProtocolError(f"field {name!r} must be an integer, got {type(value).__name__}")
    if value < lo or value > hi:
        raise ProtocolError(f"field {name!r}={value} is outside [{lo}, {hi}]")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"field {name!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError(f"field {name!r} is not finite")
    return float(value)


def _check_options(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be a map, got {type(value).__name__}")
    if len(value) > MAX_OPTIONS:
        raise ProtocolError(f"field {name!r} has {len(value)} entries (limit {MAX_OPTIONS})")
    out: dict[str, Any] = {}
    for key, item in value.items():
        _check_str(f"{name} key", key, OPTION_KEY)
        if isinstance(item, bool):
            out[key] = item
        elif isinstance(item, int):
            out[key] = _check_int(f"{name}.{key}", item, -(1 << 63), MAX_COUNT)
        elif isinstance(item, float):
            out[key] = _check_float(f"{name}.{key}", item)
        elif isinstance(item, str):
            out[key] = _check_str(f"{name}.{key}", item, OPTION_TEXT)
        else:
            raise ProtocolError(f"option {key!r} has unsupported type {type(item).__name__}")
    return out


def _check_header_field(kind: Kind, name: str, value: Any) -> Any:
    """Validate one header field of the given kind; return it in its Python form."""
    if kind.name in ("text", "source"):  # a source in the header is its string form
        return _check_str(name, value, kind.text)
    if kind.name == "count":
        return _check_int(name, value, 0, MAX_COUNT)
    if kind.name == "time":
        return _check_float(name, value)
    if kind.name == "flag":
        if not isinstance(value, bool):
            raise ProtocolError(f"field {name!r} must be a bool, got {type(value).__name__}")
        return value
    if kind.name == "grid":
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            raise ProtocolError(f"field {name!r} must be 3 integers")
        return tuple(_check_int(f"{name}[{i}]", v, 1, MAX_GRID) for i, v in enumerate(value))
    if kind.name == "options":
        return _check_options(name, value)
    raise ProtocolError(f"field {name!r} must travel as a frame")


def _check_frame_spec(kind: Kind, spec: FrameSpec, limits: Limits) -> None:
    if kind.name == "source":
        if spec.dtype != BYTES:
            raise ProtocolError(f"field {spec.field!r} must be bytes, got {spec.dtype}")
        if spec.nbytes == 0:
            raise ProtocolError(f"field {spec.field!r} is empty")
    elif kind.name == "matrix":
        if spec.dtype not in DTYPES:
            raise ProtocolError(f"field {spec.field!r} has dtype {spec.dtype!r}; allowed: {sorted(DTYPES)}")
        if len(spec.shape) != 2:
            raise ProtocolError(f"field {spec.field!r} must be 2-D, got shape {list(spec.shape)}")
    if spec.nbytes > limits.max_frame_bytes:
        raise ProtocolError(f"field {spec.field!r} is {spec.nbytes} bytes (limit {limits.max_frame_bytes})")


def _spec_for(name: str, shape: Sequence[Any], dtype: str, limits: Limits) -> FrameSpec:
    if not isinstance(shape, (list, tuple)):
        raise ProtocolError(f"frame {name!r}: shape must be a list")
    if len(shape) > limits.max_ndim:
        raise ProtocolError(f"frame {name!r}: {len(shape)} dims (limit {limits.max_ndim})")
    dims = tuple(shape)
    for d in dims:
        if not _is_int(d):
            raise ProtocolError(f"frame {name!r}: shape entry {d!r:.40} must be an integer")
        if d < 0 or d > limits.max_dim:
            raise ProtocolError(f"frame {name!r}: dimension {d} is outside [0, {limits.max_dim}]")
    itemsize = 1 if dtype == BYTES else DTYPES[dtype].itemsize
    return FrameSpec(name, dtype, dims, math.prod(dims) * itemsize)


def _check_total(specs: Sequence[FrameSpec], limits: Limits) -> None:
    total = sum(spec.nbytes for spec in specs)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message is {total} bytes (limit {limits.max_message_bytes})")


# ----------------------------------------------------------------------------- sending side


def split_message(
    msg: Message, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], list[tuple[FrameSpec, Payload]]]:
    """Check `msg` and split it into a msgpack-ready header and its frame payloads.

    Tensor payloads are returned as contiguous, detached tensors on their own device; the
    transport decides how they travel (host frames for zmq, a device copy for cuda_ipc).
    """
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "WIRE_TYPE", None)) is not cls:
        raise ProtocolError(f"{cls.__name__} is not a wire message type")
    header_fields: dict[str, Any] = {}
    payloads: list[tuple[FrameSpec, Payload]] = []
    for name, kind in wire_fields(cls).items():
        value = getattr(msg, name)
        if kind.name == "matrix":
            if not isinstance(value, torch.Tensor):
                raise ProtocolError(f"field {name!r} must be a torch.Tensor")
            if value.dtype not in DTYPE_NAMES:
                raise ProtocolError(f"field {name!r} has dtype {value.dtype}; allowed: {sorted(DTYPES)}")
            tensor = value.detach().contiguous()
            spec = _spec_for(name, list(tensor.shape), DTYPE_NAMES[tensor.dtype], limits)
            _check_frame_spec(kind, spec, limits)
            payloads.append((spec, tensor))
        elif kind.name == "source" and isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            spec = FrameSpec(name, BYTES, (len(data),), len(data))
            _check_frame_spec(kind, spec, limits)
            payloads.append((spec, data))
        else:
            checked = _check_header_field(kind, name, value)
            header_fields[name] = list(checked) if kind.name == "grid" else checked
    _check_total([spec for spec, _ in payloads], limits)
    frames = [{"field": spec.field, "dtype": spec.dtype, "shape": list(spec.shape)} for spec, _ in payloads]
    return {"v": PROTOCOL_VERSION, "type": cls.WIRE_TYPE, "fields": header_fields, "frames": frames}, payloads


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def host_buffer(payload: Payload) -> memoryview:
    """A zero-copy byte view of a payload in host memory (device tensors are copied to host).

    numpy has no bfloat16, so tensors are viewed as uint8 first; the view shares memory with
    the tensor and keeps it alive for as long as the frame is referenced.
    """
    if isinstance(payload, bytes):
        return memoryview(payload)
    tensor = payload if payload.device.type == "cpu" else payload.cpu()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def encode_message(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[Buffer]:
    """Frame 0 is the msgpack header; then one raw frame per tensor or byte field, zero-copy."""
    header, payloads = split_message(msg, limits)
    return [pack_header(header)] + [host_buffer(payload) for _, payload in payloads]


# --------------------------------------------------------------------------- receiving side


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def unpack_map(raw: Buffer, what: str) -> dict[Any, Any]:
    """Plain msgpack -> a map, refusing extension types and garbage with a ProtocolError."""
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_reject_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage, truncation, bad utf-8
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a map, got {type(value).__name__}")
    return value


def check_version(version: Any) -> None:
    if not _is_int(version):
        raise ProtocolError("header has no protocol version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this build speaks {PROTOCOL_VERSION})")


def _frame_spec(wire_type: str, kinds: dict[str, Kind], item: Any, seen: list[FrameSpec], limits: Limits) -> FrameSpec:
    if not (isinstance(item, dict) and set(item) == _FRAME_KEYS):
        raise ProtocolError(f"bad frame description {item!r:.200}")
    name, dtype = item["field"], item["dtype"]
    kind = kinds.get(name) if isinstance(name, str) else None
    if kind is None or kind.name not in ("matrix", "source"):
        raise ProtocolError(f"{wire_type}: field {name!r:.80} cannot travel as a frame")
    if any(spec.field == name for spec in seen):
        raise ProtocolError(f"{wire_type}: frame for {name!r} given twice")
    if not (isinstance(dtype, str) and (dtype in DTYPES or dtype == BYTES)):
        raise ProtocolError(f"frame {name!r}: dtype {dtype!r:.40} is not allowed; allowed: {sorted(DTYPES)}")
    spec = _spec_for(name, item["shape"], dtype, limits)
    _check_frame_spec(kind, spec, limits)
    return spec


def parse_header(raw: Buffer, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate frame 0 completely: version, type, every field, every frame description."""
    size = memoryview(raw).nbytes
    if size > limits.max_header_bytes:
        raise ProtocolError(f"header is {size} bytes (limit {limits.max_header_bytes})")
    header = unpack_map(raw, "header")
    check_version(header.get("v"))
    if set(header) != _HEADER_KEYS:
        raise ProtocolError(f"header keys {sorted(map(str, header))} != {sorted(_HEADER_KEYS)}")
    wire_type = header["type"]
    cls = MESSAGE_TYPES.get(wire_type) if isinstance(wire_type, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {wire_type!r:.80}")
    kinds = wire_fields(cls)
    raw_fields, raw_frames = header["fields"], header["frames"]
    if not isinstance(raw_fields, dict):
        raise ProtocolError("header 'fields' must be a map")
    if not isinstance(raw_frames, list):
        raise ProtocolError("header 'frames' must be a list")
    if len(raw_frames) > limits.max_frames:
        raise ProtocolError(f"{len(raw_frames)} frames (limit {limits.max_frames})")
    frames: list[FrameSpec] = []
    for item in raw_frames:
        frames.append(_frame_spec(wire_type, kinds, item, frames, limits))
    _check_total(frames, limits)

    expected = set(kinds) - {spec.field for spec in frames}
    if set(raw_fields) != expected:
        raise ProtocolError(f"{wire_type}: header fields {sorted(map(str, raw_fields))} != expected {sorted(expected)}")
    checked = {name: _check_header_field(kinds[name], name, raw_fields[name]) for name in expected}
    return Header(cls, checked, frames)


def tensor_from_buffer(buf: Buffer, spec: FrameSpec) -> torch.Tensor:
    """Wrap a received frame as a tensor of spec's dtype and shape; copy only when unsafe not to.

    A copy is made when the buffer is read-only (torch tensors are always writable, so wrapping
    it would let the consumer scribble on memory it does not own, e.g. a bytes object) or when
    it is not aligned to the element size (zmq packs small frames into shared receive buffers at
    any offset; typed kernels assume natural alignment).
    """
    view = memoryview(buf).cast("B")
    dtype = DTYPES[spec.dtype]
    if view.nbytes == 0:
        return torch.empty(spec.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(view) if view.readonly else view, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).reshape(spec.shape)


def frame_payload(frame: Any, spec: FrameSpec) -> Payload:
    """A received frame as its payload, once its length matches the spec."""
    size = memoryview(frame).nbytes
    if size != spec.nbytes:
        raise ProtocolError(
            f"frame {spec.field!r}: {size} bytes, but {spec.dtype}{list(spec.shape)} needs {spec.nbytes}"
        )
    return bytes(frame) if spec.dtype == BYTES else tensor_from_buffer(frame, spec)


def assemble(header: Header, payloads: Sequence[Payload]) -> Message:
    """Build the message from a validated header and one payload per frame spec, in order."""
    if len(payloads) != len(header.frames):
        raise ProtocolError(f"expected {len(header.frames)} payloads, got {len(payloads)}")
    values = dict(header.fields)
    for spec, payload in zip(header.frames, payloads, strict=True):
        if spec.dtype == BYTES:
            ok = isinstance(payload, bytes) and len(payload) == spec.nbytes
        else:
            ok = (
                isinstance(payload, torch.Tensor)
                and payload.dtype == DTYPES[spec.dtype]
                and tuple(payload.shape) == spec.shape
            )
        if not ok:
            raise ProtocolError(f"frame {spec.field!r} mismatch")
        values[spec.field] = payload
    return header.cls(**values)


def decode_message(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Frames (bytes, memoryviews or zmq.Frame objects) -> a message, or ProtocolError(reason)."""
    if not (isinstance(frames, (list, tuple)) and len(frames) >= 1):
        raise ProtocolError("no frames")
    if len(frames) > 1 + limits.max_frames:
        raise ProtocolError(f"{len(frames) - 1} data frames (limit {limits.max_frames})")
    header = parse_header(frames[0], limits)
    if len(frames) - 1 != len(header.frames):
        raise ProtocolError(
            f"{header.cls.WIRE_TYPE}: header describes {len(header.frames)} data frames, got {len(frames) - 1}"
        )
    payloads = [frame_payload(frame, spec) for spec, frame in zip(header.frames, frames[1:], strict=True)]
    return assemble(header, payloads)
