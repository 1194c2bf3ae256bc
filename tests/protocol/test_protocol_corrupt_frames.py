"""Corrupted or hostile header / metadata bytes are rejected as RemoteProtocolError with a specific
code and field; any single corrupted byte is caught."""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_strategies import any_message

from pp1.protocol.codec import (
    HEADER_SIZE,
    MAX_META_BYTES,
    MAX_TENSORS,
    alloc_tensors,
    decode,
    decode_header,
    decode_meta,
    encode,
    encode_meta,
)
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.messages import Action, ErrorCode, MessageKind, PPEnvelopeV1, PPResultV1
from pp1.protocol.tensors import TensorSpec

ENV = PPEnvelopeV1(
    action=Action.INFER,
    call_id=3,
    num_denoising_steps=1,
    timesteps=(1000,),
    expected_generator_calls=1,
    tensors=(TensorSpec(name="noise", dtype="float32", shape=(1, 2)),),
)
GOOD = encode(ENV, [torch.zeros(1, 2)])
ENV_OBJ = json.loads(GOOD.meta)


def header(
    *,
    magic: bytes = b"PP1F",
    version: int = 1,
    kind: int = 1,
    meta_len: int | None = None,
    n_tensors: int = 1,
    crc: int | None = None,
    meta: bytes = GOOD.meta,
    reserved: bytes = bytes(12),
) -> bytes:
    return (
        struct.pack(
            "<4sHHIII",
            magic,
            version,
            kind,
            len(meta) if meta_len is None else meta_len,
            n_tensors,
            zlib.crc32(meta) if crc is None else crc,
        )
        + reserved
    )


def meta_of(obj: Any) -> bytes:
    """``obj`` as the canonical form spells it: keys in the order given (the models' field order), no spaces."""
    return json.dumps(obj, separators=(",", ":")).encode()


RES_INF = encode(PPResultV1(action=Action.NOOP, ok=True, call_id=1, timings_ms={"decode": 1.5})).meta.replace(
    b"1.5", b"1e999")


def with_fields(**kw: Any) -> bytes:
    obj = dict(ENV_OBJ)
    for k, v in kw.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    return meta_of(obj)


def tensor_dtype(d: str) -> bytes:
    return with_fields(tensors=[{"name": "noise", "dtype": d, "shape": [1, 2]}])


HEADER_CASES = [
    ("short", header()[:31], "bad_header_size", "header"),
    ("long", header() + b"\0", "bad_header_size", "header"),
    ("magic", header(magic=b"HTTP"), "bad_magic", "header.magic"),
    ("version_2", header(version=2), "unsupported_version", "header.version"),
    ("version_0", header(version=0), "unsupported_version", "header.version"),
    ("kind_0", header(kind=0), "unknown_kind", "header.kind"),
    ("kind_9", header(kind=9), "unknown_kind", "header.kind"),
    ("reserved", header(reserved=b"\1" + bytes(11)), "bad_reserved", "header.reserved"),
    ("meta_len_huge", header(meta_len=MAX_META_BYTES + 1), "meta_too_large", "header.meta_len"),
    ("meta_len_max_u32", header(meta_len=2**32 - 1), "meta_too_large", "header.meta_len"),
    ("too_many_tensors", header(n_tensors=MAX_TENSORS + 1), "too_many_tensors", "header.n_tensors"),
]


@pytest.mark.parametrize(
    ("raw", "code", "field"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_bad_header(raw: bytes, code: str, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(raw)
    assert (info.value.code, info.value.field) == (code, field), str(info.value)


META_CASES = [
    ("short", header(), GOOD.meta[:-1], "short_meta", "envelope.meta"),
    ("long", header(), GOOD.meta + b" ", "long_meta", "envelope.meta"),
    ("crc", header(crc=zlib.crc32(GOOD.meta) ^ 1), GOOD.meta, "crc_mismatch", "envelope.meta"),
    ("flipped_byte", header(), GOOD.meta[:5] + b"X" + GOOD.meta[6:], "crc_mismatch", "envelope.meta"),
    ("not_json", header(meta=b"{nope"), b"{nope", "bad_json", "envelope.meta"),
    ("not_utf8", header(meta=b"\xff\xfe"), b"\xff\xfe", "bad_json", "envelope.meta"),
    ("array", header(meta=b"[1]"), b"[1]", "bad_json", "envelope.meta"),
    ("nan", header(meta=b'{"x":NaN}'), b'{"x":NaN}', "bad_json", "envelope.meta"),
    (
        "meta_version_2",
        header(meta=with_fields(version=2)),
        with_fields(version=2),
        "unsupported_version",
        "envelope.version",
    ),
    (
        "missing_call_id",
        header(meta=with_fields(call_id=None)),
        with_fields(call_id=None),
        "missing_field",
        "envelope.call_id",
    ),
    (
        "unknown_field",
        header(meta=with_fields(bogus=1)),
        with_fields(bogus=1),
        "unknown_field",
        "envelope.bogus",
    ),
    (
        "negative_call_id",
        header(meta=with_fields(call_id=-1)),
        with_fields(call_id=-1),
        "invalid_field",
        "envelope.call_id",
    ),
    (
        "bad_action",
        header(meta=with_fields(action="dance")),
        with_fields(action="dance"),
        "invalid_field",
        "envelope.action",
    ),
    (
        "bad_tensor_dtype",
        header(meta=tensor_dtype("complex64")),
        tensor_dtype("complex64"),
        "invalid_field",
        "envelope.tensors[0].dtype",
    ),
    (
        "string_call_id",
        header(meta=with_fields(call_id="3")),
        with_fields(call_id="3"),
        "non_canonical_meta",
        "envelope.meta",
    ),
    (  # the canonical form before issue 10's third round: no longer canonical
        "sorted_keys",
        header(meta=json.dumps(ENV_OBJ, sort_keys=True, separators=(",", ":")).encode()),
        json.dumps(ENV_OBJ, sort_keys=True, separators=(",", ":")).encode(),
        "non_canonical_meta",
        "envelope.meta",
    ),
    (
        "spaced_json",
        header(meta=json.dumps(ENV_OBJ, sort_keys=True).encode()),
        json.dumps(ENV_OBJ, sort_keys=True).encode(),
        "non_canonical_meta",
        "envelope.meta",
    ),
    ("count_vs_header", header(n_tensors=0), GOOD.meta, "tensor_count_mismatch", "envelope.tensors"),
    (  # JSON cannot spell Inf, but a number too large for a float parses to it: the codec's rule, on receipt
        "overflowing_timing",
        header(kind=2, n_tensors=0, meta=RES_INF),
        RES_INF,
        "non_finite_float",
        "result.timings_ms.decode",
    ),
    (
        "result_meta_as_envelope",
        header(meta=encode(PPResultV1(action=Action.NOOP, ok=True, call_id=1)).meta),
        encode(PPResultV1(action=Action.NOOP, ok=True, call_id=1)).meta,
        "unknown_field",
        "envelope.ok",
    ),
    (
        "huge_tensor",
        header(meta=with_fields(tensors=[{"name": "noise", "dtype": "int64", "shape": [2**20] * 3}])),
        with_fields(tensors=[{"name": "noise", "dtype": "int64", "shape": [2**20] * 3}]),
        "payload_too_large",
        "envelope.tensors",
    ),
]


@pytest.mark.parametrize(
    ("head", "meta", "code", "field"), [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES]
)
def test_bad_meta(head: bytes, meta: bytes, code: str, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(head, meta)
    assert (info.value.code, info.value.field) == (code, field), str(info.value)


def test_good_frames_decode() -> None:
    assert decode(GOOD.header, GOOD.meta) == ENV
    assert decode_header(GOOD.header).kind is MessageKind.PP_ENVELOPE


@settings(max_examples=150, deadline=None)
@given(msg=any_message, data=st.data())
def test_any_single_corrupted_byte_is_caught(msg: Any, data: st.DataObject) -> None:
    """One byte changed anywhere in header + meta: decoding raises RemoteProtocolError (crc32 catches
    every single-byte change in the meta; the header's fields are each checked)."""
    f = encode(msg, alloc_tensors(msg.tensors))
    raw = bytearray(f.header + f.meta)
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RemoteProtocolError):
        h = decode_header(bytes(raw[:HEADER_SIZE]))
        decode_meta(h, bytes(raw[HEADER_SIZE : HEADER_SIZE + h.meta_len]))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unserialisable_message_is_a_local_error() -> None:
    bad = PPResultV1.model_construct(
        **{**dict(PPResultV1(action=Action.NOOP, ok=True, call_id=1)), "call_id": object()}
    )
    with pytest.raises(LocalProtocolError) as info:
        encode_meta(bad)
    assert info.value.code == "not_serialisable"


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode({"action": "noop"})  # type: ignore[arg-type]
    assert info.value.code == "bad_message"


def test_constants_and_non_ascii_inside_strings_travel() -> None:
    """The canonical form is UTF-8, and a string may spell NaN or Infinity (only a float may not)."""
    res = PPResultV1(action=Action.NOOP, ok=False, call_id=1, error_code=ErrorCode.GENERATOR_FAILED,
                     error_message="NaN -Infinity in the latents: ßé 漢")
    f = encode(res)
    assert "漢".encode() in f.meta
    assert decode(f.header, f.meta) == res
