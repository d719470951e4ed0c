"""Messages <-> frames: a msgpack header, then one raw frame per tensor or byte string.

    frame 0   msgpack {"v": PROTOCOL_VERSION, "type": "encode_result",
                       "fields": {scalar fields},
                       "frames": [{"field": "embeddings", "dtype": "bfloat16", "shape": [N, D]}]}
    frame i   the raw little-endian bytes of frames[i-1], C order

Tensors are sent zero-copy (a memoryview over the tensor's own memory) and received zero-copy
where the buffer allows. No pickle: the header is plain msgpack (no ext types), and tensors
are rebuilt from a dtype whitelist and a shape whose byte size must equal the frame length.

Everything a peer sends is checked before it is used; a bad message raises ProtocolError with
the reason, which receivers log before they drop the message and keep serving.

The layers are public so the region transports (cuda_ipc, shm, nixl) can reuse them with
payloads that arrive through shared memory instead of frames: split_message / pack_header on
the way out, parse_header / assemble on the way in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import msgpack
import torch

from transfer.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message

# Tensors may only carry these dtypes; the wire name is the torch name without "torch.".
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
BYTES = "bytes"  # frame "dtype" of a byte-string field (e.g. EncodeJob.source)

# Field kinds that travel as frames, and those that may also sit in the header.
_FRAME_KINDS = {"matrix", "source"}
_HEADER_KINDS = {"id", "address", "code", "text", "count", "time", "flag", "grid", "options", "source"}
_HEADER_KEYS = {"v", "type", "fields", "frames"}
_FRAME_KEYS = {"field", "dtype", "shape"}

Buffer = Union[bytes, bytearray, memoryview]
Payload = Union[torch.Tensor, bytes]


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


@dataclass(frozen=True)
class FrameSpec:
    """What one raw frame must contain: `nbytes` bytes of `dtype` in `shape` (C order)."""

    field: str
    dtype: str  # a DTYPES key, or BYTES
    shape: tuple[int, ...]
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"field": self.field, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Header:
    """A validated frame 0: the message class, its header fields and the frames to expect."""

    cls: type
    fields: dict[str, Any]
    frames: list[FrameSpec]


# ---------------------------------------------------------------------------- field checks


def _check_str(name: str, value: Any, max_len: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not (allow_empty or len(value) > 0):
        raise ProtocolError(f"field {name!r} is empty")
    if not len(value) <= max_len:
        raise ProtocolError(f"field {name!r} is {len(value)} characters (limit {max_len})")
    return value


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    # bool is an int subclass; a flag where a count belongs is a peer bug, not a count.
    if not (isinstance(value, int) and not isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(f"field {name!r}={value} is outside [{lo}, {hi}]")
    return value


def _check_float(name: str, value: Any) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError(f"field {name!r} is not finite")
    return float(value)


def _check_options(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"field {name!r} must be a map, got {type(value).__name__}")
    if not len(value) <= 32:
        raise ProtocolError(f"field {name!r} has {len(value)} entries (limit 32)")
    out: dict[str, Any] = {}
    for key, item in value.items():
        _check_str(f"{name} key", key, 64)
        if isinstance(item, bool):
            out[key] = item
        elif isinstance(item, int):
            out[key] = _check_int(f"{name}.{key}", item, -(1 << 63), (1 << 63) - 1)
        elif isinstance(item, float):
            out[key] = _check_float(f"{name}.{key}", item)
        elif isinstance(item, str):
            out[key] = _check_str(f"{name}.{key}", item, 256, allow_empty=True)
        else:
            raise ProtocolError(f"option {key!r} has unsupported type {type(item).__name__}")
    return out


def _check_header_field(kind: str, name: str, value: Any) -> Any:
    """Validate one header field of the given kind; return it in its Python form."""
    if kind == "id":
        return _check_str(name, value, 256)
    if kind == "address":
        return _check_str(name, value, 1024)
    if kind == "code":
        return _check_str(name, value, 64)
    if kind == "text":
        return _check_str(name, value, 4096, allow_empty=True)
    if kind == "source":  # the string form: a URL or a path; bytes travel as a frame
        return _check_str(name, value, 8192)
    if kind == "count":
        return _check_int(name, value, 0, (1 << 63) - 1)
    if kind == "time":
        return _check_float(name, value)
    if kind == "flag":
        if not isinstance(value, bool):
            raise ProtocolError(f"field {name!r} must be a bool, got {type(value).__name__}")
        return value
    if kind == "grid":
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            raise ProtocolError(f"field {name!r} must be 3 integers")
        return tuple(_check_int(f"{name}[{i}]", v, 1, 1 << 20) for i, v in enumerate(value))
    if kind == "options":
        return _check_options(name, value)
    raise AssertionError(f"unknown field kind {kind!r}")  # a bug in messages.py, not the peer


def _check_frame_spec(kind: str, spec: FrameSpec, limits: Limits) -> None:
    if kind == "source":
        if not spec.dtype == BYTES:
            raise ProtocolError(f"field {spec.field!r} must be bytes, got {spec.dtype}")
        if not spec.nbytes > 0:
            raise ProtocolError(f"field {spec.field!r} is empty")
    elif kind == "matrix":
        if not spec.dtype in DTYPES:
            raise ProtocolError(f"field {spec.field!r} has dtype {spec.dtype!r}; allowed: {sorted(DTYPES)}")
        if not len(spec.shape) == 2:
            raise ProtocolError(f"field {spec.field!r} must be 2-D, got shape {list(spec.shape)}")
    if not spec.nbytes <= limits.max_frame_bytes:
        raise ProtocolError(f"field {spec.field!r} is {spec.nbytes} bytes (limit {limits.max_frame_bytes})")


def _spec_for(name: str, shape: Sequence[Any], dtype: str, limits: Limits) -> FrameSpec:
    if not isinstance(shape, (list, tuple)):
        raise ProtocolError(f"frame {name!r}: shape must be a list")
    if not len(shape) <= limits.max_ndim:
        raise ProtocolError(f"frame {name!r}: {len(shape)} dims (limit {limits.max_ndim})")
    dims = tuple(shape)
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool):
            raise ProtocolError(f"frame {name!r}: shape entry {d!r:.40} must be an integer")
        if not 0 <= d <= limits.max_dim:
            raise ProtocolError(f"frame {name!r}: dimension {d} is outside [0, {limits.max_dim}]")
    itemsize = 1 if dtype == BYTES else DTYPES[dtype].itemsize
    return FrameSpec(name, dtype, dims, math.prod(dims) * itemsize)


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
    for name, kind in cls.WIRE_FIELDS.items():
        value = getattr(msg, name)
        if kind == "matrix":
            if not isinstance(value, torch.Tensor):
                raise ProtocolError(f"field {name!r} must be a torch.Tensor")
            if value.dtype not in DTYPE_NAMES:
                raise ProtocolError(f"field {name!r} has dtype {value.dtype}; allowed: {sorted(DTYPES)}")
            tensor = value.detach().contiguous()
            spec = _spec_for(name, list(tensor.shape), DTYPE_NAMES[tensor.dtype], limits)
            _check_frame_spec(kind, spec, limits)
            payloads.append((spec, tensor))
        elif kind == "source" and isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            spec = FrameSpec(name, BYTES, (len(data),), len(data))
            _check_frame_spec(kind, spec, limits)
            payloads.append((spec, data))
        else:
            header_fields[name] = _check_header_field(kind, name, value)
            if kind == "grid":
                header_fields[name] = list(header_fields[name])
    total = sum(spec.nbytes for spec, _ in payloads)
    if not total <= limits.max_message_bytes:
        raise ProtocolError(f"message is {total} bytes (limit {limits.max_message_bytes})")
    header = {
        "v": PROTOCOL_VERSION,
        "type": cls.WIRE_TYPE,
        "fields": header_fields,
        "frames": [spec.to_wire() for spec, _ in payloads],
    }
    return header, payloads


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


def parse_header(raw: Buffer, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate frame 0 completely: version, type, every field, every frame description."""
    size = memoryview(raw).nbytes
    if not size <= limits.max_header_bytes:
        raise ProtocolError(f"header is {size} bytes (limit {limits.max_header_bytes})")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_reject_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage, truncation, bad utf-8
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    version = header.get("v")
    if not (isinstance(version, int) and not isinstance(version, bool)):
        raise ProtocolError("header has no protocol version")
    if not version == PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this build speaks {PROTOCOL_VERSION})")
    if not set(header) == _HEADER_KEYS:
        raise ProtocolError(f"header keys {sorted(map(str, header))} != {sorted(_HEADER_KEYS)}")
    wire_type = header["type"]
    cls = MESSAGE_TYPES.get(wire_type) if isinstance(wire_type, str) else None
    if not cls is not None:
        raise ProtocolError(f"unknown message type {wire_type!r}")
    kinds: dict[str, str] = cls.WIRE_FIELDS
    raw_fields, raw_frames = header["fields"], header["frames"]
    if not isinstance(raw_fields, dict):
        raise ProtocolError("header 'fields' must be a map")
    if not isinstance(raw_frames, list):
        raise ProtocolError("header 'frames' must be a list")
    if not len(raw_frames) <= limits.max_frames:
        raise ProtocolError(f"{len(raw_frames)} frames (limit {limits.max_frames})")

    frames: list[FrameSpec] = []
    for item in raw_frames:
        if not (isinstance(item, dict) and set(item) == _FRAME_KEYS):
            raise ProtocolError(f"bad frame description {item!r:.200}")
        name, dtype = item["field"], item["dtype"]
        if not (isinstance(name, str) and kinds.get(name) in _FRAME_KINDS):
            raise ProtocolError(f"{wire_type}: field {name!r:.80} cannot travel as a frame")
        if not name not in {s.field for s in frames}:
            raise ProtocolError(f"{wire_type}: frame for {name!r} given twice")
        if not (isinstance(dtype, str) and (dtype in DTYPES or dtype == BYTES)):
            raise ProtocolError(f"frame {name!r}: dtype {dtype!r:.40} is not allowed; allowed: {sorted(DTYPES)}")
        spec = _spec_for(name, item["shape"], dtype, limits)
        _check_frame_spec(kinds[name], spec, limits)
        frames.append(spec)
    total = sum(spec.nbytes for spec in frames)
    if not total <= limits.max_message_bytes:
        raise ProtocolError(f"message is {total} bytes (limit {limits.max_message_bytes})")

    framed = {spec.field for spec in frames}
    expected = set(kinds) - framed
    if not set(raw_fields) == expected:
        raise ProtocolError(f"{wire_type}: header fields {sorted(map(str, raw_fields))} != expected {sorted(expected)}")
    checked: dict[str, Any] = {}
    for name in expected:
        kind = kinds[name]
        if not kind in _HEADER_KINDS:
            raise ProtocolError(f"{wire_type}: field {name!r} must travel as a frame")
        checked[name] = _check_header_field(kind, name, raw_fields[name])
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


def assemble(header: Header, payloads: Sequence[Payload]) -> Message:
    """Build the message from a validated header and one payload per frame spec, in order."""
    if not len(payloads) == len(header.frames):
        raise ProtocolError(f"expected {len(header.frames)} payloads, got {len(payloads)}")
    values = dict(header.fields)
    for spec, payload in zip(header.frames, payloads, strict=True):
        if spec.dtype == BYTES:
            if not (isinstance(payload, bytes) and len(payload) == spec.nbytes):
                raise ProtocolError(f"frame {spec.field!r} mismatch")
        else:
            ok = isinstance(payload, torch.Tensor) and payload.dtype == DTYPES[spec.dtype]
            if not (ok and tuple(payload.shape) == spec.shape):
                raise ProtocolError(f"frame {spec.field!r} mismatch")
        values[spec.field] = payload
    return header.cls(**values)


def decode_message(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Frames (bytes, memoryviews or zmq.Frame objects) -> a message, or ProtocolError(reason)."""
    if not (isinstance(frames, (list, tuple)) and len(frames) >= 1):
        raise ProtocolError("no frames")
    if not len(frames) <= 1 + limits.max_frames:
        raise ProtocolError(f"{len(frames) - 1} data frames (limit {limits.max_frames})")
    header = parse_header(frames[0], limits)
    if not len(frames) - 1 == len(header.frames):
        raise ProtocolError(
            f"{header.cls.WIRE_TYPE}: header describes {len(header.frames)} data frames, got {len(frames) - 1}")
    payloads: list[Payload] = []
    for spec, frame in zip(header.frames, frames[1:], strict=True):
        size = memoryview(frame).nbytes
        if not size == spec.nbytes:
            raise ProtocolError(
                f"frame {spec.field!r}: {size} bytes, but {spec.dtype}{list(spec.shape)} needs {spec.nbytes}")
        payloads.append(bytes(frame) if spec.dtype == BYTES else tensor_from_buffer(frame, spec))
    return assemble(header, payloads)
