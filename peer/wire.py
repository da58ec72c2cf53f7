"""CBOR messages with tensors, and the length-prefixed frames that carry them.

A message is a CBOR map. A tensor inside it is an RFC 8746 multi-dimensional array:
tag 40 around ``[shape, typed_array]``, where ``typed_array`` is an RFC 8746 typed-array
tag (little-endian element types) around a byte string of the elements in row-major
order. Any CBOR library can read such a message; no side channel is needed.

A frame on a stream socket is a 4-byte big-endian unsigned length followed by that many
bytes of one CBOR message. See docs/local-api.md for the full protocol.

On the local socket a tensor's elements may instead live in shared memory the client
attached: the typed-array tag then wraps a reference, tag ``TAG_SHARED``
``[slot, offset, length]``, in place of the byte string (``decode(resolve=...)`` maps it
to the bytes; ``encode(place=...)`` writes such references).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import cbor2
import numpy as np

PROTOCOL_VERSION = 1
FRAME_HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_NESTING = 32
# Data items (every head: map keys, values, array elements, tags) one message may hold.
# A legal 8 MB frame of one-byte items would otherwise decode into millions of Python
# objects, holding the event loop for a second and growing memory by hundreds of MB;
# counting heads costs time in proportion to the limit, not to the frame's size.
DEFAULT_MAX_ITEMS = 16384

TAG_NDARRAY = 40  # RFC 8746: multi-dimensional array, row-major order
TAG_SHARED = 0x65706172  # "epar": [slot, offset, length] in a client's shared memory

# RFC 8746 typed-array tags we send (little-endian) and accept (both byte orders).
_SEND_TAGS: dict[str, int] = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
}
_RECV_DTYPES: dict[int, np.dtype] = {
    64: np.dtype("u1"),
    68: np.dtype("u1"),  # uint8 "clamped": same bytes
    65: np.dtype(">u2"),
    66: np.dtype(">u4"),
    67: np.dtype(">u8"),
    69: np.dtype("<u2"),
    70: np.dtype("<u4"),
    71: np.dtype("<u8"),
    72: np.dtype("i1"),
    73: np.dtype(">i2"),
    74: np.dtype(">i4"),
    75: np.dtype(">i8"),
    77: np.dtype("<i2"),
    78: np.dtype("<i4"),
    79: np.dtype("<i8"),
    80: np.dtype(">f2"),
    81: np.dtype(">f4"),
    82: np.dtype(">f8"),
    84: np.dtype("<f2"),
    85: np.dtype("<f4"),
    86: np.dtype("<f8"),
}
SUPPORTED_DTYPES = tuple(_SEND_TAGS)


class WireError(ValueError):
    """A message or frame that cannot be decoded. ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, too_many_items: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.too_many_items = too_many_items


def _tensor_tag(array: np.ndarray) -> cbor2.CBORTag:
    name = "bool" if array.dtype == np.bool_ else array.dtype.name
    if name == "bool":
        array = array.astype(np.uint8)
        name = "uint8"
    tag = _SEND_TAGS.get(name)
    if tag is None:
        raise WireError("bad_input", f"dtype {array.dtype} cannot be sent; use one of "
                        f"{', '.join(SUPPORTED_DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    # tobytes() emits row-major order even for non-contiguous views.
    payload = cbor2.CBORTag(tag, little.tobytes(order="C"))
    return cbor2.CBORTag(TAG_NDARRAY, [list(array.shape), payload])


def _encode_default(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if isinstance(value, np.ndarray):
        encoder.encode(_tensor_tag(value))
    elif isinstance(value, np.generic):
        encoder.encode(value.item())
    else:
        raise cbor2.CBOREncodeTypeError(f"cannot encode {type(value).__name__}")


# Given an array about to be encoded, return what to encode instead (a TAG_SHARED
# reference once its elements are copied into shared memory), or None to send it inline.
Place = Callable[[np.ndarray], "cbor2.CBORTag | None"]
# Given a TAG_SHARED reference's value, return its bytes (a uint8 array) or raise WireError.
Resolve = Callable[[Any], np.ndarray]


def shared_tensor(array: np.ndarray, reference: list[int]) -> cbor2.CBORTag:
    """tag 40 around [shape, typed-array tag around a TAG_SHARED reference]."""
    name = "uint8" if array.dtype == np.bool_ else array.dtype.name
    tag = _SEND_TAGS.get(name)
    if tag is None:
        raise WireError("bad_input", f"dtype {array.dtype} cannot be sent")
    return cbor2.CBORTag(TAG_NDARRAY, [list(array.shape),
                                       cbor2.CBORTag(tag, cbor2.CBORTag(TAG_SHARED, reference))])


def encode(message: Mapping[str, Any], place: Place | None = None) -> bytes:
    """Encode a message (a map that may hold numpy arrays) as CBOR."""
    default = _encode_default
    if place is not None:
        def default(encoder: cbor2.CBOREncoder, value: Any) -> None:
            if isinstance(value, np.ndarray):
                reference = place(value)
                if reference is not None:
                    encoder.encode(reference)
                    return
            _encode_default(encoder, value)
    try:
        return cbor2.dumps(message, default=default)
    except cbor2.CBOREncodeError as exc:
        raise WireError("bad_input", str(exc)) from exc


class _SharedBytes:
    """A resolved TAG_SHARED reference, waiting for its typed-array tag."""

    __slots__ = ("data",)

    def __init__(self, data: np.ndarray) -> None:
        self.data = data


def _tag_hook(resolve: Resolve | None) -> Callable[[cbor2.CBORTag, bool], Any]:
    def hook(tag: cbor2.CBORTag, _immutable: bool) -> Any:
        if tag.tag in _RECV_DTYPES:
            dtype = _RECV_DTYPES[tag.tag]
            value = tag.value
            if isinstance(value, _SharedBytes):
                if value.data.size % dtype.itemsize:
                    raise WireError("bad_frame", f"shared typed array of {value.data.size} "
                                    f"bytes is not a whole number of {dtype.itemsize}-byte "
                                    "elements")
                return value.data.view(dtype)  # no copy: the client's shared memory
            if not isinstance(value, bytes):
                raise WireError("bad_frame", f"typed array tag {tag.tag} must hold a byte "
                                "string")
            if len(value) % dtype.itemsize:
                raise WireError("bad_frame", f"typed array of {len(value)} bytes is not a "
                                f"whole number of {dtype.itemsize}-byte elements")
            return np.frombuffer(value, dtype=dtype)
        if tag.tag == TAG_NDARRAY:
            return _ndarray(tag.value)
        if tag.tag == TAG_SHARED:
            if resolve is None:
                raise WireError("bad_frame", "a shared-memory reference needs an attached "
                                "region (only on the local socket, after shm_attach)")
            return _SharedBytes(resolve(tag.value))
        raise WireError("bad_frame", f"unsupported CBOR tag {tag.tag}")
    return hook


_PLAIN_TAG_HOOK = _tag_hook(None)


_ONE_BYTE_CLASS = rb"\x00-\x17\x20-\x37\x40\x60\x80-\x97\xa0-\xb7\xe0-\xf7"
_ONE_BYTE_RUN = re.compile(b"[" + _ONE_BYTE_CLASS + b"]+")
_ONE_BYTE_HEAD = [bool(re.fullmatch(b"[" + _ONE_BYTE_CLASS + b"]", bytes([b])))
                  for b in range(256)]

# Integers, negative integers and floats whose argument follows the head (1, 2, 4, 8 bytes).
_SCALAR_STRIDE = [1 + (1 << ((b & 31) - 24)) if b >> 5 in (0, 1, 7) and 24 <= b & 31 <= 27
                  else 0 for b in range(256)]
_SCALAR_RUNS = {b: re.compile(b"(?:" + re.escape(bytes([b])) + b".{%d})+" % (stride - 1),
                              re.DOTALL)
                for b, stride in enumerate(_SCALAR_STRIDE) if stride}


def count_items(payload: bytes | bytearray | memoryview, limit: int) -> int:
    """The number of CBOR data-item heads in ``payload``, counting at most ``limit + 1``.

    Walks heads in order (containers need no stack: their items simply follow), skipping
    string contents by their length, so its cost is the count, whatever the size."""
    data = payload
    end = len(data)
    pos = 0
    items = 0
    while pos < end:
        head = data[pos]
        if _ONE_BYTE_HEAD[head]:
            # A run of one-byte items (small integers, empty or short containers' heads,
            # simple values) is counted by the regex engine, not item by item: a frame of
            # millions of them costs milliseconds.
            run = _ONE_BYTE_RUN.match(data, pos, min(end, pos + limit + 1 - items))
            assert run is not None
            items += run.end() - pos
            pos = run.end()
            if items > limit:
                return limit + 1
            continue
        stride = _SCALAR_STRIDE[head]
        if stride and pos + stride < end and data[pos + stride] == head:
            # Likewise a run of one multi-byte scalar kind (say 24, 24, 24, ...).
            run = _SCALAR_RUNS[head].match(data, pos, min(end, pos + stride * (limit + 1 - items)))
            if run is not None and run.end() - pos > stride:
                items += (run.end() - pos) // stride
                pos = run.end()
                if items > limit:
                    return limit + 1
                continue
        items += 1
        if items > limit:
            break
        info = head & 31
        pos += 1
        if info < 24:
            argument = info
        elif info == 24:
            argument = data[pos] if pos < end else 0
            pos += 1
        elif info < 28:
            width = 1 << (info - 24)
            argument = int.from_bytes(data[pos:pos + width], "big")
            pos += width
        else:
            argument = 0
        if (head >> 5) in (2, 3) and info != 31:
            pos += argument
    return items


def _ndarray(value: Any) -> np.ndarray:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise WireError("bad_frame", "tag 40 must hold [shape, elements]")
    shape, elements = value
    if not (isinstance(shape, (list, tuple))
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError("bad_frame", "tensor shape must be a list of non-negative integers")
    if not isinstance(elements, np.ndarray):
        raise WireError("bad_frame", "tensor elements must be an RFC 8746 typed array")
    count = 1
    for dim in shape:
        count *= dim
    if count != elements.size:
        raise WireError("bad_frame", f"tensor shape {shape} needs {count} elements, "
                        f"got {elements.size}")
    native = elements.dtype.newbyteorder("=")
    if elements.dtype != native:
        elements = elements.astype(native)
    return elements.reshape(shape)


def decode(payload: bytes | bytearray | memoryview, max_items: int = DEFAULT_MAX_ITEMS,
           resolve: Resolve | None = None) -> dict[str, Any]:
    """Decode one CBOR message; raise WireError with a protocol code on any fault.

    ``max_items`` bounds the data items (checked before any object is built);
    ``resolve`` maps shared-memory references (the local socket's attached regions)."""
    if count_items(payload, max_items) > max_items:
        raise WireError("bad_frame", f"the message holds more than {max_items} CBOR data "
                        "items", too_many_items=True)
    stream = io.BytesIO(payload)
    hook = _PLAIN_TAG_HOOK if resolve is None else _tag_hook(resolve)
    try:
        # read_size=1 keeps the stream position exact, so trailing bytes are detected.
        decoder = cbor2.CBORDecoder(stream, tag_hook=hook, max_depth=MAX_NESTING,
                                    read_size=1)
        message = decoder.decode()
    except WireError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, WireError) else None
        if cause is not None:
            raise cause from None
        raise WireError("bad_frame", f"not a CBOR message: {exc}") from None
    if not isinstance(message, Mapping):
        raise WireError("bad_frame", f"a message must be a CBOR map, got {type(message).__name__}")
    if stream.tell() != len(payload):
        raise WireError("bad_frame", f"{len(payload) - stream.tell()} bytes follow the message "
                        "in its frame")
    return dict(message)  # a self-described (tag 55799) map decodes as an immutable one


def peek_id(payload: bytes | bytearray | memoryview) -> Any:
    """The request id of a message that failed to decode fully, if it can be read at all,
    so the error reply reaches the right in-flight request."""
    if count_items(payload, DEFAULT_MAX_ITEMS) > DEFAULT_MAX_ITEMS:
        return None  # decoding it at all is what the limit prevents
    try:
        message = cbor2.loads(payload, max_depth=MAX_NESTING, tag_hook=_peek_tag)
    except Exception:  # the payload is already known to be bad; any failure means no id
        return None
    request_id = message.get("id") if isinstance(message, Mapping) else None
    return request_id if valid_id(request_id) else None


def _peek_tag(tag: cbor2.CBORTag, _immutable: bool) -> Any:
    return None  # tensors and references do not matter to the id


def valid_id(value: Any) -> bool:
    """Request ids are text or integers that fit in 64 bits."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return isinstance(value, str)


def frame(payload: bytes) -> bytes:
    """Prefix one encoded message with its length."""
    return FRAME_HEADER.pack(len(payload)) + payload


def parse_frame_length(header: bytes, max_bytes: int) -> int:
    """Validate the 4-byte length prefix of a frame."""
    (length,) = FRAME_HEADER.unpack(header)
    if length == 0:
        raise WireError("bad_frame", "empty frame")
    if length > max_bytes:
        raise WireError("frame_too_large", f"frame of {length} bytes exceeds the limit of "
                        f"{max_bytes} bytes")
    return length


# --- tensors as separate frames (node-to-node data plane) ---------------------------------
#
# Between nodes, a message is a ZeroMQ multipart: one CBOR header, then one raw frame per
# tensor. Tensors travel as their own frames so pyzmq sends them without copying (wrapping
# them inside the CBOR costs a copy and runs 3-5x slower, FACTS.md). The header's
# "tensors" lists each frame's name, dtype, shape and optional compression.

COMPRESSIONS = ("none", "fp16")


def pack(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
         compress: str = "none") -> list[Any]:
    """Header plus tensors → frames for ``send_multipart(copy=False)``.

    ``compress="fp16"`` halves float32 activations on slow links (lossy: ~1e-3 relative).
    """
    if compress not in COMPRESSIONS:
        raise WireError("bad_input", f"unknown compression {compress!r}")
    specs = []
    frames: list[Any] = []
    for name, array in tensors.items():
        wire_dtype = array.dtype
        if compress == "fp16" and array.dtype == np.float32:
            array = array.astype(np.float16)
        array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        specs.append({"name": name, "dtype": wire_dtype.name, "sent": array.dtype.name,
                      "shape": list(array.shape)})
        frames.append(memoryview(array).cast("B") if array.size else b"")
    return [encode({**header, "tensors": specs}), *frames]


def unpack(frames: list[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Frames from ``recv_multipart(copy=False)`` → header and tensors (views, no copy)."""
    if not frames:
        raise WireError("bad_frame", "empty multipart message")
    header = decode(bytes(frames[0].buffer) if hasattr(frames[0], "buffer") else frames[0])
    return header, unpack_tensors(header, frames[1:])


def unpack_tensors(header: dict[str, Any], frames: list[Any]) -> dict[str, np.ndarray]:
    """The tensor frames after a decoded header (whose "tensors" entry this removes)."""
    specs = header.pop("tensors", [])
    if not isinstance(specs, list) or len(specs) != len(frames):
        listed = len(specs) if isinstance(specs, list) else "?"
        raise WireError("bad_frame", f"header lists {listed} tensors, {len(frames)} "
                        "frames follow")
    tensors: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames, strict=True):
        try:
            sent = np.dtype(spec["sent"]).newbyteorder("<")
            wanted = np.dtype(spec["dtype"])
            shape = [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError("bad_frame", f"bad tensor spec {spec!r}: {exc}") from None
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        try:
            array = np.frombuffer(buffer, dtype=sent).reshape(shape)
        except ValueError as exc:
            raise WireError("bad_frame", f"tensor {spec.get('name')!r}: {exc}") from None
        tensors[str(spec["name"])] = array if array.dtype == wanted else array.astype(wanted)
    return tensors


# --- whole messages with their tensors as frames (forwarded API requests and replies) -----
#
# A forwarded API message is a CBOR map that may hold tensors (and byte strings such as an
# encoded image) anywhere in nested maps. They leave the CBOR header and travel as raw
# frames like stage activations; the header's "places" says where each one goes back:
# its path of map keys, and "bytes" for a byte string. Sender: no copy (a contiguous
# array's memory is the frame). Receiver: tensors are views of the frames; a byte string
# costs one copy (consumers want ``bytes``).

MAX_PLACES = 1024  # tensors per message: far above any model's inputs or outputs


def pack_message(header: Mapping[str, Any], message: Mapping[str, Any]) -> list[Any]:
    """Header plus a message that may hold tensors → frames (see ``unpack_message``)."""
    places: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}

    def strip(value: Mapping[str, Any], path: list[Any]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        for key, item in value.items():
            named = isinstance(key, (str, int)) and not isinstance(key, bool)
            if isinstance(item, Mapping):
                kept[key] = strip(item, [*path, key])
            elif named and isinstance(item, np.ndarray):
                if item.dtype == np.bool_:
                    item = item.astype(np.uint8)
                if item.dtype.name not in _SEND_TAGS:
                    raise WireError("bad_input", f"dtype {item.dtype} cannot be sent; use "
                                    f"one of {', '.join(SUPPORTED_DTYPES)}")
                places.append({"path": [*path, key]})
                arrays[str(len(arrays))] = item
            elif named and isinstance(item, (bytes, bytearray)):
                places.append({"path": [*path, key], "bytes": True})
                arrays[str(len(arrays))] = np.frombuffer(item, np.uint8)
            else:
                kept[key] = item  # a key no path can name stays inline
        return kept

    skeleton = strip(message, [])
    if len(places) > MAX_PLACES:
        raise WireError("bad_input", f"{len(places)} tensors in one message; at most "
                        f"{MAX_PLACES}")
    return pack({**header, "msg": skeleton, "places": places}, arrays)


def unpack_message(frames: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Frames of ``pack_message`` → (header, message with its tensors back in place)."""
    header, arrays = unpack(frames)
    return header, restore_message(header, arrays)


def restore_message(header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The message of a ``pack_message`` header (whose "msg" and "places" this removes),
    with the tensors of its frames back in place."""
    message = header.pop("msg", None)
    places = header.pop("places", None)
    if not isinstance(message, dict) or not isinstance(places, list) \
            or len(places) != len(arrays) or len(places) > MAX_PLACES:
        raise WireError("bad_frame", "a message needs a map 'msg' and one place per tensor")
    for index, place in enumerate(places):
        path = place.get("path") if isinstance(place, dict) else None
        if not isinstance(path, list) or not path or not all(
                isinstance(k, (str, int)) and not isinstance(k, bool) for k in path):
            raise WireError("bad_frame", f"bad tensor place {place!r}")
        target: Any = message
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                raise WireError("bad_frame", f"tensor place {path!r} is not inside a map")
        array = arrays.get(str(index))
        if array is None:
            raise WireError("bad_frame", f"no frame for tensor place {index}")
        target[path[-1]] = array.tobytes() if place.get("bytes") is True else array
    return message
