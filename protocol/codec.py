"""Message <-> frames codec (no I/O).

A message travels as three parts, in this order:

1. a fixed-size header of ``HEADER_SIZE`` (32) bytes, little-endian::

       offset size field
       0      4    magic      b"PP1F"
       4      2    version    protocol version (PROTOCOL_VERSION)
       6      2    kind       MessageKind (1 envelope, 2 result, 3 TP header, 4 ready)
       8      4    meta_len   length of the metadata bytes (<= MAX_META_BYTES)
       12     4    n_tensors  number of tensors that follow the metadata
       16     4    crc32      zlib.crc32 of the metadata bytes
       20     12   reserved   zero

2. the metadata: the canonical JSON of the pydantic model, pydantic's own (``model_dump_json``: fields in
   their declared order, no spaces, UTF-8, finite floats);
3. the tensors, in the order of ``msg.tensors``, each exactly as its spec announces (dtype, shape).

A receiver reads the header, then ``meta_len`` bytes, decodes the message, allocates the announced
tensors with :func:`alloc_tensors` and receives into them. Encoding checks everything first and
raises :class:`LocalProtocolError` before producing any frame; decoding raises
:class:`RemoteProtocolError`. torch is used for tensors only, never torch.distributed.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, MessageKind
from .tensors import SUPPORTED_DTYPES, TensorSpec

MAGIC = b"PP1F"
_HEADER = struct.Struct("<4sHHIII12x")
HEADER_SIZE: int = _HEADER.size  # 32
MAX_META_BYTES: int = 64 * 1024  # control messages are small; a bigger one is a bug or an attack
MAX_TENSORS: int = 16
MAX_PAYLOAD_BYTES: int = 16 * 1024**3  # sum of a message's tensor bytes; bounds a receiver's allocation

# Field-path prefix per message kind ("envelope.tensors[1].shape").
WHERE: dict[MessageKind, str] = {
    MessageKind.PP_ENVELOPE: "envelope",
    MessageKind.PP_RESULT: "result",
    MessageKind.TP_HEADER: "tp_header",
    MessageKind.READY: "ready",
}

assert HEADER_SIZE == 32

# Every code the codec raises, with what it means (the preflight's are in preflight.CODES).
CODEC_CODES: dict[str, str] = {
    "bad_message": "encode: not one of the four message types",
    "not_serialisable": "encode: metadata cannot be dumped as JSON",
    "non_finite_float": "a float field is NaN or Inf (JSON cannot carry it)",
    "meta_too_large": "metadata longer than MAX_META_BYTES (encode, or the header's meta_len)",
    "too_many_tensors": "more than MAX_TENSORS tensors announced",
    "payload_too_large": "announced tensor bytes exceed MAX_PAYLOAD_BYTES",
    "tensor_count_mismatch": "tensors given / announced / counted in the header disagree",
    "not_a_tensor": "encode: a tensor argument is not a torch.Tensor",
    "bad_dtype": "a tensor's dtype is not its spec's",
    "bad_shape": "a tensor's shape is not its spec's",
    "bad_header_size": "decode: header is not HEADER_SIZE bytes",
    "bad_magic": "decode: header does not start with MAGIC",
    "unsupported_version": "decode: header or metadata version is not PROTOCOL_VERSION",
    "bad_reserved": "decode: reserved header bytes are not zero",
    "unknown_kind": "decode: header kind is not a MessageKind",
    "short_meta": "decode: fewer metadata bytes than the header announced",
    "long_meta": "decode: more metadata bytes than the header announced",
    "crc_mismatch": "decode: crc32 of the metadata differs from the header's",
    "bad_json": "decode: metadata is not a UTF-8 JSON object with finite numbers",
    "missing_field": "decode: a required field is absent",
    "unknown_field": "decode: a field the message type does not have",
    "invalid_field": "decode: a field fails the message type's validation",
    "non_canonical_meta": "decode: metadata is not the canonical encoding of the message it parses to",
}


@dataclass(frozen=True)
class FrameHeader:
    """The decoded fixed-size header."""

    kind: MessageKind
    version: int
    meta_len: int
    n_tensors: int
    crc: int


@dataclass
class Frames:
    """One encoded message: send ``header``, then ``meta``, then each of ``tensors`` in order."""

    header: bytes
    meta: bytes
    tensors: list[torch.Tensor]

    @property
    def control(self) -> bytes:
        """Header and metadata as one byte string (for channels that send them together)."""
        return self.header + self.meta


# -- dtypes ------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the wire name)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """Wire name -> torch dtype; only SUPPORTED_DTYPES."""
    name = name.removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return getattr(torch, name)


def where_of(msg: Any) -> str:
    kind = getattr(type(msg), "KIND", None)
    return WHERE.get(kind, type(msg).__name__) if kind is not None else type(msg).__name__


# -- tensors -----------------------------------------------------------------------------------------


def check_tensors(
    specs: Sequence[TensorSpec],
    tensors: Sequence[Any],
    error_cls: type[ProtocolError] = LocalProtocolError,
    where: str = "message",
) -> None:
    """Every tensor matches its spec, in order: count, type, dtype, shape.

    Shared by :func:`encode` (LocalProtocolError) and receivers checking what they got
    (RemoteProtocolError).
    """
    if len(tensors) != len(specs):
        raise error_cls(
            f"{where}.tensors",
            f"{len(specs)} tensor(s) announced {[s.name for s in specs]}, {len(tensors)} given",
            "tensor_count_mismatch",
        )
    for i, (spec, t) in enumerate(zip(specs, tensors, strict=True)):
        path = f"{where}.tensors[{i}]"
        if not isinstance(t, torch.Tensor):
            raise error_cls(
                path, f"{spec.name}: expected a torch.Tensor, got {type(t).__name__}", "not_a_tensor"
            )
        got = dtype_name(t.dtype)
        if got != spec.dtype:
            raise error_cls(
                f"{path}.dtype", f"{spec.name}: spec says {spec.dtype}, tensor is {got}", "bad_dtype"
            )
        if tuple(t.shape) != tuple(spec.shape):
            raise error_cls(
                f"{path}.shape",
                f"{spec.name}: spec says {tuple(spec.shape)}, tensor is {tuple(t.shape)}",
                "bad_shape",
            )


def alloc_tensors(specs: Iterable[TensorSpec], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Receive buffers for announced tensors (uninitialised, contiguous)."""
    return [torch.empty(tuple(s.shape), dtype=torch_dtype(s.dtype), device=device) for s in specs]


def bytes_to_tensor(b: bytes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bytes -> a 1-D uint8 tensor (a copy; gloo sends tensors, not bytes)."""
    if len(b) == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    t = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return t if torch.device(device).type == "cpu" else t.to(device)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, any device), in C order."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


# -- metadata ----------------------------------------------------------------------------------------


def _first_non_finite(obj: Any, path: str) -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _first_non_finite(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _first_non_finite(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _spells_constant(meta: bytes) -> bool:
    """Whether ``meta`` may hold a JSON constant (NaN, Infinity): the models write a non-finite float as one
    (``ser_json_inf_nan``) and pydantic's parser takes one, but JSON has none. A hit may be a string's text:
    the callers then look closer."""
    return b"NaN" in meta or b"Infinity" in meta


def _non_finite_error(msg: Message, where: str, error_cls: type[ProtocolError]) -> ProtocolError | None:
    """``non_finite_float`` at the first non-finite float field of ``msg``, if it has one."""
    try:
        bad = _first_non_finite(msg.model_dump(warnings=False), where)  # only to say where: no warning
    except Exception:  # noqa: BLE001 - not even a Python dump: not serialisable (the caller's error)
        return None
    return error_cls(bad, "non-finite float (NaN/Inf) cannot travel as JSON", "non_finite_float") if bad else None


def encode_meta(msg: Message, error_cls: type[ProtocolError] = LocalProtocolError) -> bytes:
    """Canonical JSON of a message, checked: serialisable, finite floats, at most MAX_META_BYTES. The one
    place a message becomes JSON (the sender's :func:`encode`, the receiver's canonical check in
    :func:`decode_meta`): pydantic's serialiser, compiled, so a hop pays microseconds for it."""
    where = where_of(msg)
    try:
        # a value not of its field's type (a model_construct'ed message) raises rather than turning into null
        meta = type(msg).__pydantic_serializer__.to_json(msg, warnings="error")  # model_dump_json, as bytes
    except Exception as exc:
        err = _non_finite_error(msg, where, error_cls)
        if err is not None:
            raise err from None
        raise error_cls(where, f"not serialisable: {exc}", "not_serialisable") from exc
    if _spells_constant(meta):
        err = _non_finite_error(msg, where, error_cls)
        if err is not None:
            raise err
    if len(meta) > MAX_META_BYTES:
        raise error_cls(
            where, f"metadata is {len(meta)} bytes > MAX_META_BYTES={MAX_META_BYTES}", "meta_too_large"
        )
    return meta


def check_payload(specs: Sequence[TensorSpec], error_cls: type[ProtocolError], where: str) -> None:
    if len(specs) > MAX_TENSORS:
        raise error_cls(
            f"{where}.tensors", f"{len(specs)} tensors > MAX_TENSORS={MAX_TENSORS}", "too_many_tensors"
        )
    total = sum(s.nbytes for s in specs)
    if total > MAX_PAYLOAD_BYTES:
        raise error_cls(
            f"{where}.tensors",
            f"{total} tensor bytes > MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}",
            "payload_too_large",
        )


def encode(msg: Message, tensors: Sequence[torch.Tensor] = ()) -> Frames:
    """Frames for ``msg`` and its tensors. Raises LocalProtocolError, producing nothing, when the
    message is not serialisable or a tensor does not match its spec."""
    kind = getattr(type(msg), "KIND", None)
    if kind not in MESSAGE_TYPES or not isinstance(msg, MESSAGE_TYPES[kind]):
        raise LocalProtocolError("message", f"not a protocol message: {type(msg).__name__}", "bad_message")
    where = WHERE[kind]
    if msg.version != PROTOCOL_VERSION:
        raise LocalProtocolError(
            f"{where}.version", f"version {msg.version!r} != {PROTOCOL_VERSION}", "unsupported_version"
        )
    meta = encode_meta(msg)
    check_payload(msg.tensors, LocalProtocolError, where)
    check_tensors(msg.tensors, tensors, LocalProtocolError, where)
    header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, int(kind), len(meta), len(msg.tensors), zlib.crc32(meta))
    return Frames(header=header, meta=meta, tensors=[t.contiguous() for t in tensors])


# -- decoding ----------------------------------------------------------------------------------------


def decode_header(b: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse the fixed-size header; RemoteProtocolError on anything unexpected."""
    b = bytes(b)
    if len(b) != HEADER_SIZE:
        raise RemoteProtocolError("header", f"{len(b)} bytes, expected {HEADER_SIZE}", "bad_header_size")
    magic, version, kind, meta_len, n_tensors, crc = _HEADER.unpack(b)
    if magic != MAGIC:
        raise RemoteProtocolError("header.magic", f"{magic!r} != {MAGIC!r}", "bad_magic")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            "header.version",
            f"protocol version {version} is not supported (this rank speaks {PROTOCOL_VERSION})",
            "unsupported_version",
        )
    if b[20:32] != bytes(12):
        raise RemoteProtocolError("header.reserved", "reserved bytes are not zero", "bad_reserved")
    try:
        mkind = MessageKind(kind)
    except ValueError:
        raise RemoteProtocolError("header.kind", f"unknown message kind {kind}", "unknown_kind") from None
    if mkind not in MESSAGE_TYPES:  # pragma: no cover - every MessageKind has a type
        raise RemoteProtocolError("header.kind", f"no message type for kind {mkind.name}", "unknown_kind")
    if meta_len > MAX_META_BYTES:
        raise RemoteProtocolError(
            "header.meta_len", f"{meta_len} > MAX_META_BYTES={MAX_META_BYTES}", "meta_too_large"
        )
    if n_tensors > MAX_TENSORS:
        raise RemoteProtocolError(
            "header.n_tensors", f"{n_tensors} > MAX_TENSORS={MAX_TENSORS}", "too_many_tensors"
        )
    return FrameHeader(kind=mkind, version=version, meta_len=meta_len, n_tensors=n_tensors, crc=crc)


def field_path(where: str, loc: Sequence[int | str]) -> str:
    """pydantic's error loc -> a field path: ("tensors", 1, "shape") -> "envelope.tensors[1].shape"."""
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


_PYDANTIC_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field",
                   "json_invalid": "bad_json", "json_type": "bad_json", "model_type": "bad_json"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite float {name} in metadata")


def _refuse_constants(where: str, meta: bytes) -> None:
    """bad_json when ``meta`` spells NaN or Infinity outside a string (not JSON, though pydantic parses it)."""
    try:
        json.loads(meta, parse_constant=_reject_constant)
    except ValueError as exc:
        raise RemoteProtocolError(f"{where}.meta", f"not valid JSON: {exc}", "bad_json") from None


def _decode_error(where: str, exc: ValidationError) -> RemoteProtocolError:
    """The first of pydantic's errors as the codec's; a version other than this one's is said first (a message
    of another version may fail on other fields too)."""
    errors = exc.errors(include_url=False)
    version = next((e for e in errors if tuple(e["loc"]) == ("version",) and e["type"] == "literal_error"), None)
    if version is not None:
        return RemoteProtocolError(f"{where}.version", f"message version {version['input']!r} is not supported",
                                   "unsupported_version")
    err = errors[0]
    code = _PYDANTIC_CODES.get(err["type"], "invalid_field")
    if code == "bad_json":
        return RemoteProtocolError(f"{where}.meta", f"not a JSON object: {err['msg']}", code)
    return RemoteProtocolError(field_path(where, err["loc"]), err["msg"], code)


def decode_meta(h: FrameHeader, meta: bytes | bytearray | memoryview) -> Message:
    """The message the header announced; RemoteProtocolError on a bad length, CRC, JSON or field."""
    where = WHERE[h.kind]
    meta = bytes(meta)
    if len(meta) != h.meta_len:
        code = "short_meta" if len(meta) < h.meta_len else "long_meta"
        raise RemoteProtocolError(f"{where}.meta", f"{len(meta)} bytes, header announced {h.meta_len}", code)
    if zlib.crc32(meta) != h.crc:
        raise RemoteProtocolError(
            f"{where}.meta", f"crc32 {zlib.crc32(meta):#010x} != header {h.crc:#010x}", "crc_mismatch"
        )
    if _spells_constant(meta):
        _refuse_constants(where, meta)
    try:
        # model_validate_json (pydantic's parser: UTF-8 JSON, then the fields), minus its Python wrapper
        msg = MESSAGE_TYPES[h.kind].__pydantic_validator__.validate_json(meta)
    except ValidationError as exc:
        raise _decode_error(where, exc) from None
    # Lax parsing accepts what no sender emits ("3" for an int, 1.0 for a bool, spaces, another key order, a
    # number that overflows to Inf): only the canonical form travels.
    canonical = encode_meta(msg, RemoteProtocolError)
    if canonical != meta:
        raise RemoteProtocolError(
            f"{where}.meta", "metadata is not the canonical encoding of its message", "non_canonical_meta"
        )
    if len(msg.tensors) != h.n_tensors:
        raise RemoteProtocolError(
            f"{where}.tensors",
            f"{len(msg.tensors)} tensor specs, header announced {h.n_tensors}",
            "tensor_count_mismatch",
        )
    check_payload(msg.tensors, RemoteProtocolError, where)
    return msg  # type: ignore[return-value]


def decode(header: bytes, meta: bytes) -> Message:
    """decode_header + decode_meta, for callers holding both."""
    return decode_meta(decode_header(header), meta)
