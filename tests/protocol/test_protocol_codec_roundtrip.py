"""Codec round trips: every message kind, with tensors of every supported dtype (zero-size dims
included), survives encode -> bytes -> decode bit for bit; valid chunk traffic passes the same
rules on both sides."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_strategies import (
    any_message,
    envelopes,
    geometries,
    latents_spec,
    make_tensor,
    message_with_tensors,
    readies,
    results,
    tp_headers,
    valid_infer,
)

from pp1.protocol import codec
from pp1.protocol.codec import (
    HEADER_SIZE,
    MAX_META_BYTES,
    alloc_tensors,
    bytes_to_tensor,
    check_tensors,
    decode_header,
    decode_meta,
    encode,
    tensor_to_bytes,
)
from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.messages import PROTOCOL_VERSION, Action, PPResultV1, relay_header
from pp1.protocol.preflight import (
    check_result_matches,
    preflight_envelope,
    preflight_result,
    preflight_tp_header,
    validate_envelope,
    validate_result,
    validate_tp_header,
)
from pp1.protocol.tensors import TensorSpec

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def transmit(frames: codec.Frames):
    """What a receiver does: header bytes -> meta bytes -> allocate -> copy each tensor's bytes in."""
    wire_header = bytes_to_tensor(frames.header)
    wire_meta = bytes_to_tensor(frames.meta)
    h = decode_header(tensor_to_bytes(wire_header))
    msg = decode_meta(h, tensor_to_bytes(wire_meta))
    bufs = alloc_tensors(msg.tensors, "cpu")
    for buf, sent in zip(bufs, frames.tensors, strict=True):
        buf.reshape(-1).view(torch.uint8).copy_(bytes_to_tensor(tensor_to_bytes(sent)))
    check_tensors(msg.tensors, bufs, RemoteProtocolError, "received")
    return h, msg, bufs


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_to_bytes(a) == tensor_to_bytes(b)


@pytest.mark.parametrize(
    "strategy", [envelopes, results, tp_headers, readies], ids=["envelope", "result", "tp_header", "ready"]
)
@SETTINGS
@given(data=st.data())
def test_roundtrip_every_kind(strategy, data) -> None:
    msg, tensors = data.draw(message_with_tensors(strategy))
    frames = encode(msg, tensors)
    assert len(frames.header) == HEADER_SIZE
    assert len(frames.meta) <= MAX_META_BYTES
    h, got, bufs = transmit(frames)
    assert h.kind == type(msg).KIND and h.version == PROTOCOL_VERSION
    assert h.meta_len == len(frames.meta) and h.n_tensors == len(msg.tensors)
    assert got == msg and type(got) is type(msg)
    assert all(same_bits(a, b) for a, b in zip(bufs, tensors, strict=True))


@SETTINGS
@given(any_message)
def test_encoding_is_canonical_and_deterministic(msg) -> None:
    tensors = [make_tensor(s, 0) for s in msg.tensors]
    a, b = encode(msg, tensors), encode(msg, tensors)
    assert a.header == b.header and a.meta == b.meta
    assert encode(decode_meta(decode_header(a.header), a.meta), tensors).meta == a.meta


@pytest.mark.parametrize("dtype", ["bfloat16", "uint8", "int64", "float16", "int32", "float32"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3)])
def test_tensor_bytes_roundtrip(dtype: str, shape: tuple[int, ...]) -> None:
    spec = TensorSpec(name="x", dtype=dtype, shape=shape)
    t = make_tensor(spec, 7)
    raw = tensor_to_bytes(t)
    assert len(raw) == spec.nbytes
    back = bytes_to_tensor(raw)
    assert back.dtype == torch.uint8 and back.dim() == 1
    (buf,) = alloc_tensors([spec])
    buf.reshape(-1).view(torch.uint8).copy_(back)
    assert same_bits(buf, t)


def test_non_contiguous_tensor_travels_contiguous() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    spec = TensorSpec(name="x", dtype="float32", shape=(4, 3))
    msg = PPResultV1(action=Action.NOOP, ok=True, call_id=1, tensors=(spec,))
    frames = encode(msg, [t])
    assert frames.tensors[0].is_contiguous() and torch.equal(frames.tensors[0], t)


def test_header_layout_is_documented() -> None:
    msg = PPResultV1(action=Action.PING, ok=True, call_id=9)
    f = encode(msg)
    magic, version, kind, meta_len, n_tensors, crc = struct.unpack_from("<4sHHIII", f.header)
    assert (magic, version, kind, meta_len, n_tensors) == (b"PP1F", 1, 2, len(f.meta), 0)
    assert f.header[20:] == bytes(12)
    assert f.control == f.header + f.meta


@SETTINGS
@given(data=st.data())
def test_valid_chunk_traffic_passes_both_sides(data) -> None:
    """A preflight-valid envelope decodes, passes the leader's validation, relays to a valid TP
    header, and its ok result passes the front's checks: the two sides run the same rules."""
    geometry = data.draw(geometries)
    env, tensors = data.draw(valid_infer(geometry))
    preflight_envelope(env, tensors, geometry, env.call_id - 1)
    _, got, bufs = transmit(encode(env, tensors))
    validate_envelope(got, geometry, env.call_id - 1)

    tp = relay_header(got)
    preflight_tp_header(tp, bufs, geometry)
    _, tp_got, _ = transmit(encode(tp, bufs))
    validate_tp_header(tp_got, geometry)

    spec = latents_spec(geometry)
    res = PPResultV1(
        action=Action.INFER,
        ok=True,
        call_id=env.call_id,
        chunk_index=env.chunk_index,
        cache_epoch=env.cache_epoch,
        observed_generator_calls=env.expected_generator_calls,
        timings_ms={"generator": 1.5},
        tensors=(spec,),
    )
    latents = make_tensor(spec, 3)
    preflight_result(res, [latents], geometry)
    _, res_got, res_bufs = transmit(encode(res, [latents]))
    validate_result(res_got, geometry)
    check_result_matches(res_got, env)
    assert same_bits(res_bufs[0], latents)
