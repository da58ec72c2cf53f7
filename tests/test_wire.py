"""The CBOR message codec: RFC 8746 tensors, framing limits, and a fuzzed decoder."""

from __future__ import annotations

import struct

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epara.peer import wire
from epara.peer.wire import WireError

DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_round_trip_every_dtype(dtype: str) -> None:
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    message = wire.decode(wire.encode({"id": 1, "t": array}))
    assert message["t"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(message["t"], array)


def test_non_contiguous_array_is_sent_in_logical_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a Fortran-ordered view
    decoded = wire.decode(wire.encode({"t": array}))["t"]
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_typed_arrays_decode_to_native_values() -> None:
    payload = np.array([1.5, -2.0], dtype=">f4").tobytes()
    encoded = cbor2.dumps({"t": cbor2.CBORTag(40, [[2], cbor2.CBORTag(81, payload)])})
    np.testing.assert_array_equal(wire.decode(encoded)["t"], [1.5, -2.0])


def test_encoding_is_standard_rfc8746() -> None:
    encoded = wire.encode({"t": np.array([[1, 2]], dtype=np.int32)})
    plain = cbor2.loads(encoded)  # any CBOR library sees tags 40 and 78
    tag = plain["t"]
    assert tag.tag == 40 and list(tag.value[0]) == [1, 2]
    assert tag.value[1].tag == 78 and tag.value[1].value == struct.pack("<2i", 1, 2)


def test_scalars_and_empty_tensors() -> None:
    message = wire.decode(wire.encode({"s": np.float32(2.5), "e": np.zeros((0, 3), np.int64)}))
    assert message["s"] == 2.5
    assert message["e"].shape == (0, 3)


@pytest.mark.parametrize("payload, code", [
    (b"\xff\xfe\x00", "bad_frame"),  # not CBOR
    (cbor2.dumps([1, 2]), "bad_frame"),  # not a map
    (cbor2.dumps({"t": cbor2.CBORTag(40, [[3], cbor2.CBORTag(85, b"\0" * 8)])}), "bad_frame"),
    (cbor2.dumps({"t": cbor2.CBORTag(85, b"\0" * 3)}), "bad_frame"),  # partial element
    (cbor2.dumps({"t": cbor2.CBORTag(40, [[-1], cbor2.CBORTag(85, b"")])}), "bad_frame"),
    (cbor2.dumps({"t": cbor2.CBORTag(40, "nope")}), "bad_frame"),
    (cbor2.dumps({"t": cbor2.CBORTag(999, 1)}), "bad_frame"),  # unknown tag
    (cbor2.dumps({"a": 1})[:-1], "bad_frame"),  # truncated
])
def test_bad_messages_raise_wire_errors(payload: bytes, code: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode(payload)
    assert info.value.code == code


def test_deep_nesting_is_refused() -> None:
    nested: object = 1
    for _ in range(200):
        nested = [nested]
    with pytest.raises(WireError):
        wire.decode(cbor2.dumps({"x": nested}))


def test_frame_length_limits() -> None:
    assert wire.parse_frame_length(struct.pack(">I", 10), 100) == 10
    with pytest.raises(WireError) as info:
        wire.parse_frame_length(struct.pack(">I", 101), 100)
    assert info.value.code == "frame_too_large"
    with pytest.raises(WireError):
        wire.parse_frame_length(struct.pack(">I", 0), 100)


def test_objects_that_cannot_be_sent_are_refused() -> None:
    with pytest.raises(WireError):
        wire.encode({"x": object()})
    with pytest.raises(WireError):
        wire.encode({"x": np.array(["a"], dtype=object)})


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_decoder_only_raises_wire_errors(payload: bytes) -> None:
    try:
        message = wire.decode(payload)
    except WireError:
        return
    assert isinstance(message, dict)


_cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_cbor_values, st.integers(0, 120), st.integers(0, 255))
def test_fuzz_mutated_valid_messages(value: object, position: int, byte: int) -> None:
    encoded = bytearray(wire.encode({"id": 7, "v": value,
                                     "t": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    encoded[position % len(encoded)] = byte
    try:
        message = wire.decode(bytes(encoded))
    except WireError:
        return
    assert isinstance(message, dict)


def test_trailing_bytes_after_the_message_are_refused() -> None:
    with pytest.raises(WireError, match="follow the message"):
        wire.decode(cbor2.dumps({"a": 1}) + b"\x00")


def test_self_described_cbor_is_accepted() -> None:
    assert wire.decode(cbor2.dumps(cbor2.CBORTag(55799, {"a": 1}))) == {"a": 1}


def test_peek_id_recovers_the_id_of_a_message_with_a_bad_tensor() -> None:
    bad = cbor2.dumps({"id": "r7", "t": cbor2.CBORTag(40, [[3], cbor2.CBORTag(85, b"\0" * 8)])})
    with pytest.raises(WireError):
        wire.decode(bad)
    assert wire.peek_id(bad) == "r7"
    assert wire.peek_id(b"\xff") is None
    assert wire.peek_id(cbor2.dumps({"id": 1.5})) is None


def test_item_count_is_limited_before_decoding() -> None:
    payload = cbor2.dumps({"a": [0] * 100, "b": b"x" * 1000, "c": "text"})
    assert wire.count_items(payload, 10_000) == 1 + (1 + 1 + 100) + (1 + 1) + (1 + 1)
    assert wire.count_items(payload, 50) == 51  # stops counting past the limit
    assert wire.decode(payload, max_items=107)["c"] == "text"
    with pytest.raises(WireError) as info:
        wire.decode(payload, max_items=106)
    assert info.value.code == "bad_frame" and "items" in str(info.value)
    huge = cbor2.dumps({"x": [0] * 2_000_000})
    with pytest.raises(WireError):
        wire.decode(huge)
    assert wire.peek_id(huge) is None


def test_shared_references_need_a_resolver() -> None:
    region = np.arange(64, dtype=np.uint8)
    payload = wire.encode({"t": wire.shared_tensor(np.zeros((2, 2), np.float32), [0, 0, 16])})
    with pytest.raises(WireError) as info:
        wire.decode(payload)
    assert info.value.code == "bad_frame"
    decoded = wire.decode(payload, resolve=lambda ref: region[ref[1]:ref[1] + ref[2]])["t"]
    assert decoded.shape == (2, 2) and decoded.dtype == np.float32
    assert np.shares_memory(decoded, region)  # no copy
