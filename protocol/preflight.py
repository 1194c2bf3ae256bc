"""Rules every message must satisfy, checked before the first frame is sent (no I/O).

The sender calls ``preflight_*`` (raising LocalProtocolError: nothing was sent); the receiver runs
the SAME rules through ``validate_*`` (raising RemoteProtocolError: the peer broke them). The
rules take the error class as an argument, so the two sides cannot drift apart.

Each side checks a message once, and its metadata becomes JSON once per side: the rules here never
encode. A sender's ``preflight_*`` runs the rules, then the codec's ``encode`` (serialisable, finite
floats, sizes, tensors against their specs) and returns the frames to send: the bytes checked are the
bytes sent. A receiver's ``decode`` checks the frame and the canonical encoding, then ``validate_*`` runs
the rules on the decoded message. ``validate_*`` is only ever given a message that came through
``encode`` or ``decode`` (the in-process channel of pure TP encodes what it hands over).

Each violation has its own stable ``code`` (listed in ``CODES``) and the dotted path of the field.

Cache flags (semantics the mesh implements; documented in specs/protocol.md):
- ``init_cache``: first chunk of an epoch. Implies a reset: the mesh starts from an empty KV cache
  and ``current_start_frame`` 0, whatever ``reset_cache`` says. Never with ``do_kv_recompute``
  (there is nothing to recompute before the first chunk).
- ``reset_cache``: drop the KV cache before this chunk (hard cut without a new first chunk).
- ``do_kv_recompute``: rebuild the KV cache from ``context_frames`` before denoising; requires
  ``context_frames`` (1..max_context_frames latent frames), and counts as one generator call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .codec import Frames, check_payload, encode, where_of
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .geometry import ChunkGeometry
from .messages import (
    PROTOCOL_VERSION,
    T_CONDITIONING,
    T_CONTEXT,
    T_LATENTS_OUT,
    T_NOISE,
    Action,
    ErrorCode,
    PPEnvelopeV1,
    PPResultV1,
    ReadyV1,
    TPHeaderV1,
)
from .tensors import SUPPORTED_DTYPES, TensorSpec

ErrorCls = type[ProtocolError]

MAX_TIMESTEP = 1000

# Which actions each channel carries.
ENVELOPE_ACTIONS = frozenset({Action.NOOP, Action.INFER, Action.PING, Action.SHUTDOWN})
RESULT_ACTIONS = ENVELOPE_ACTIONS
TP_ACTIONS = frozenset({Action.NOOP, Action.INFER, Action.WARMUP, Action.PING, Action.SHUTDOWN})
COMPUTE_ACTIONS = frozenset({Action.INFER, Action.WARMUP})  # carry a chunk's tensors

# Every code the preflight raises, with what it means (the codec adds its own: see specs/protocol.md).
CODES: dict[str, str] = {
    "unsupported_version": "message version is not PROTOCOL_VERSION",
    "not_serialisable": "metadata cannot be encoded as JSON",
    "non_finite_float": "a float field is NaN or Inf",
    "meta_too_large": "metadata exceeds MAX_META_BYTES",
    "too_many_tensors": "more than MAX_TENSORS tensors",
    "payload_too_large": "tensor bytes exceed MAX_PAYLOAD_BYTES",
    "bad_action": "action not carried by this channel",
    "call_id_not_increasing": "call_id <= the last call_id seen on this channel",
    "duplicate_tensor": "two tensor specs share a name",
    "unexpected_tensor": "a tensor this action/flag combination does not carry",
    "missing_conditioning": "INFER without conditioning",
    "missing_noise": "INFER without noise",
    "missing_context_frames": "do_kv_recompute without context_frames",
    "unexpected_context_frames": "context_frames without do_kv_recompute",
    "missing_latents_out": "ok INFER result without latents_out",
    "bad_tensor_order": "tensors not in the documented travel order",
    "bad_dtype": "dtype unsupported or not geometry.dtype",
    "bad_shape": "shape not the geometry's",
    "bad_context_frames": "context frame count outside 1..max_context_frames",
    "no_steps": "INFER with zero denoising steps",
    "steps_mismatch": "num_denoising_steps != len(timesteps)",
    "timesteps_not_decreasing": "timesteps not strictly decreasing",
    "timestep_out_of_range": "a timestep outside (0, 1000]",
    "calls_mismatch": "expected_generator_calls != steps + recompute",
    "recompute_on_init": "do_kv_recompute on the first chunk of an epoch (init_cache)",
    "unexpected_infer_field": "a non-INFER message sets an INFER-only field",
    "missing_error_code": "ok=False without an error code",
    "error_code_on_ok": "ok=True with an error code or message",
    "warmup_count_mismatch": "len(warmup_ms) != warmup_chunks",
    "epoch_not_increasing": "cache_epoch went backwards",
    "epoch_without_init": "a new cache_epoch whose first chunk does not set init_cache",
    "id_mismatch": "result's action/call_id/chunk_index/cache_epoch differ from the envelope's",
    "tripwire_calls": "observed generator calls != expected",
}


# -- shared rules --------------------------------------------------------------------------------------


def check_common(msg: Any, allowed_actions: frozenset[Action] | None, error_cls: ErrorCls) -> str:
    """Version, sizes, action, unique tensor names, supported dtypes (serialisability is the codec's:
    ``encode`` / ``decode``). Returns the field-path prefix of the message."""
    where = where_of(msg)
    if msg.version != PROTOCOL_VERSION:
        raise error_cls(f"{where}.version", f"{msg.version!r} != {PROTOCOL_VERSION}", "unsupported_version")
    check_payload(msg.tensors, error_cls, where)
    if allowed_actions is not None and msg.action not in allowed_actions:
        allowed = sorted(a.value for a in allowed_actions)
        raise error_cls(
            f"{where}.action", f"{msg.action!r} not carried here; allowed: {allowed}", "bad_action"
        )
    seen: set[str] = set()
    for i, spec in enumerate(msg.tensors):
        if spec.name in seen:
            raise error_cls(
                f"{where}.tensors[{i}].name", f"duplicate tensor name {spec.name!r}", "duplicate_tensor"
            )
        seen.add(spec.name)
        if spec.dtype not in SUPPORTED_DTYPES:
            raise error_cls(f"{where}.tensors[{i}].dtype", f"unsupported dtype {spec.dtype!r}", "bad_dtype")
    return where


def check_call_id(call_id: int, last_call_id: int | None, where: str, error_cls: ErrorCls) -> None:
    if last_call_id is not None and call_id <= last_call_id:
        raise error_cls(
            f"{where}.call_id",
            f"{call_id} is not greater than the last call_id {last_call_id}",
            "call_id_not_increasing",
        )


def check_timesteps(timesteps: Sequence[int], where: str, error_cls: ErrorCls) -> None:
    if len(timesteps) < 1:
        raise error_cls(f"{where}.timesteps", "at least one denoising step is required", "no_steps")
    for i, t in enumerate(timesteps):
        if not 0 < t <= MAX_TIMESTEP:
            raise error_cls(
                f"{where}.timesteps[{i}]", f"{t} outside (0, {MAX_TIMESTEP}]", "timestep_out_of_range"
            )
        if i and t >= timesteps[i - 1]:
            raise error_cls(
                f"{where}.timesteps[{i}]",
                f"{t} >= {timesteps[i - 1]}: timesteps must strictly decrease",
                "timesteps_not_decreasing",
            )


def _expect_no_tensors(msg: Any, where: str, why: str, error_cls: ErrorCls) -> None:
    if msg.tensors:
        raise error_cls(
            f"{where}.tensors[0]", f"{why} carries no tensors, got {msg.tensor_names()}", "unexpected_tensor"
        )


def _expect_defaults(msg: Any, fields: Sequence[str], where: str, error_cls: ErrorCls) -> None:
    defaults = type(msg).model_fields
    for name in fields:
        value, default = getattr(msg, name), defaults[name].get_default(call_default_factory=True)
        if value != default:
            raise error_cls(
                f"{where}.{name}",
                f"{msg.action.value} must not set {name} (got {value!r}, expected {default!r})",
                "unexpected_infer_field",
            )


def _check_spec(
    spec: TensorSpec, i: int, shape: tuple[int, ...], dtype: str, where: str, error_cls: ErrorCls
) -> None:
    if spec.dtype != dtype:
        raise error_cls(
            f"{where}.tensors[{i}].dtype", f"{spec.name}: {spec.dtype} != geometry dtype {dtype}", "bad_dtype"
        )
    if tuple(spec.shape) != tuple(shape):
        raise error_cls(
            f"{where}.tensors[{i}].shape", f"{spec.name}: {tuple(spec.shape)} != {tuple(shape)}", "bad_shape"
        )


def check_chunk_tensors(msg: Any, geometry: ChunkGeometry, where: str, error_cls: ErrorCls) -> None:
    """An INFER/WARMUP message announces conditioning, noise, then context_frames iff do_kv_recompute,
    in that order, with the geometry's shapes and dtype."""
    dtype = geometry.dtype.removeprefix("torch.")
    names = list(msg.tensor_names())
    for i, name in enumerate(names):
        if name not in (T_CONDITIONING, T_NOISE, T_CONTEXT):
            raise error_cls(
                f"{where}.tensors[{i}].name", f"{name!r} is not a chunk tensor", "unexpected_tensor"
            )
    if T_CONDITIONING not in names:
        raise error_cls(f"{where}.tensors", f"{T_CONDITIONING} is required", "missing_conditioning")
    if T_NOISE not in names:
        raise error_cls(f"{where}.tensors", f"{T_NOISE} is required", "missing_noise")
    if msg.do_kv_recompute and T_CONTEXT not in names:
        raise error_cls(f"{where}.tensors", f"do_kv_recompute requires {T_CONTEXT}", "missing_context_frames")
    if not msg.do_kv_recompute and T_CONTEXT in names:
        i = names.index(T_CONTEXT)
        raise error_cls(
            f"{where}.tensors[{i}]", f"{T_CONTEXT} without do_kv_recompute", "unexpected_context_frames"
        )
    order = [T_CONDITIONING, T_NOISE] + ([T_CONTEXT] if msg.do_kv_recompute else [])
    if names != order:
        raise error_cls(f"{where}.tensors", f"order {names} != {order}", "bad_tensor_order")
    specs = msg.tensors
    _check_spec(specs[0], 0, geometry.conditioning_shape(), dtype, where, error_cls)
    _check_spec(specs[1], 1, geometry.noise_shape(), dtype, where, error_cls)
    if msg.do_kv_recompute:
        ctx = specs[2]
        path = f"{where}.tensors[2]"
        if ctx.dtype != dtype:
            raise error_cls(
                f"{path}.dtype", f"{T_CONTEXT}: {ctx.dtype} != geometry dtype {dtype}", "bad_dtype"
            )
        if len(ctx.shape) != 4:
            raise error_cls(
                f"{path}.shape", f"{T_CONTEXT}: 4 dims [C, T, h, w] expected, got {ctx.shape}", "bad_shape"
            )
        frames = ctx.shape[1]
        if not 1 <= frames <= geometry.max_context_frames:
            raise error_cls(
                f"{path}.shape[1]",
                f"{frames} context frames outside 1..{geometry.max_context_frames}",
                "bad_context_frames",
            )
        _check_spec(ctx, 2, geometry.context_shape(frames), dtype, where, error_cls)


def _check_cache_flags(msg: Any, where: str, error_cls: ErrorCls) -> None:
    if msg.init_cache and msg.do_kv_recompute:
        raise error_cls(
            f"{where}.do_kv_recompute",
            "the first chunk of an epoch (init_cache) has nothing to recompute",
            "recompute_on_init",
        )


# -- PP envelope (front -> leader) ---------------------------------------------------------------------


_INFER_ONLY_ENVELOPE = (
    "init_cache",
    "reset_cache",
    "do_kv_recompute",
    "num_denoising_steps",
    "timesteps",
    "expected_generator_calls",
)


def validate_envelope(
    env: PPEnvelopeV1,
    geometry: ChunkGeometry,
    last_call_id: int | None,
    error_cls: ErrorCls = RemoteProtocolError,
    *,
    last_cache_epoch: int | None = None,
) -> None:
    """Metadata rules of a PP envelope. The leader calls it on receipt (RemoteProtocolError) and
    answers ``ok=False, error_code=INVALID_ENVELOPE`` to anything it rejects, never relaying it.

    ``last_cache_epoch`` (optional): the epoch of the last INFER; an INFER must not go back, and the
    first INFER of a new epoch must set ``init_cache``.
    """
    where = check_common(env, ENVELOPE_ACTIONS, error_cls)
    check_call_id(env.call_id, last_call_id, where, error_cls)
    if env.action is not Action.INFER:
        _expect_no_tensors(env, where, env.action.value, error_cls)
        _expect_defaults(env, _INFER_ONLY_ENVELOPE, where, error_cls)
        return
    if env.num_denoising_steps < 1:
        raise error_cls(f"{where}.num_denoising_steps", "INFER needs at least one denoising step", "no_steps")
    if env.num_denoising_steps != len(env.timesteps):
        raise error_cls(
            f"{where}.num_denoising_steps",
            f"{env.num_denoising_steps} != len(timesteps) = {len(env.timesteps)}",
            "steps_mismatch",
        )
    check_timesteps(env.timesteps, where, error_cls)
    expected = env.num_denoising_steps + (1 if env.do_kv_recompute else 0)
    if env.expected_generator_calls != expected:
        raise error_cls(
            f"{where}.expected_generator_calls",
            f"{env.expected_generator_calls} != steps + recompute = {expected}",
            "calls_mismatch",
        )
    _check_cache_flags(env, where, error_cls)
    if last_cache_epoch is not None:
        if env.cache_epoch < last_cache_epoch:
            raise error_cls(
                f"{where}.cache_epoch",
                f"{env.cache_epoch} < last epoch {last_cache_epoch}",
                "epoch_not_increasing",
            )
        if env.cache_epoch > last_cache_epoch and not env.init_cache:
            raise error_cls(
                f"{where}.init_cache",
                f"first chunk of epoch {env.cache_epoch} must set init_cache",
                "epoch_without_init",
            )
    check_chunk_tensors(env, geometry, where, error_cls)


def preflight_envelope(
    env: PPEnvelopeV1,
    tensors: Sequence[Any],
    geometry: ChunkGeometry,
    last_call_id: int | None,
    *,
    last_cache_epoch: int | None = None,
) -> Frames:
    """The front, before sending anything: the envelope's rules, then its encoding (its tensors against
    their specs). Raises LocalProtocolError; on success, the frames to send."""
    validate_envelope(env, geometry, last_call_id, LocalProtocolError, last_cache_epoch=last_cache_epoch)
    return encode(env, tensors)


# -- PP result (leader -> front) -----------------------------------------------------------------------


def validate_result(
    res: PPResultV1, geometry: ChunkGeometry, error_cls: ErrorCls = RemoteProtocolError
) -> None:
    """Metadata rules of a PP result (the front runs them on receipt)."""
    where = check_common(res, RESULT_ACTIONS, error_cls)
    if not res.ok:
        if res.error_code is None:
            raise error_cls(f"{where}.error_code", "ok=False requires an error code", "missing_error_code")
        _expect_no_tensors(res, where, "a failed result", error_cls)
        return
    if res.error_code is not None or res.error_message:
        raise error_cls(
            f"{where}.error_code", "ok=True must not carry an error code or message", "error_code_on_ok"
        )
    if res.action is not Action.INFER:
        _expect_no_tensors(res, where, f"a {res.action.value} result", error_cls)
        return
    names = list(res.tensor_names())
    if names != [T_LATENTS_OUT]:
        if T_LATENTS_OUT not in names:
            raise error_cls(
                f"{where}.tensors", f"ok INFER result needs {T_LATENTS_OUT}", "missing_latents_out"
            )
        extra = next(i for i, n in enumerate(names) if n != T_LATENTS_OUT)
        raise error_cls(
            f"{where}.tensors[{extra}]", f"only {T_LATENTS_OUT} travels, got {names}", "unexpected_tensor"
        )
    _check_spec(
        res.tensors[0], 0, geometry.latents_shape(), geometry.dtype.removeprefix("torch."), where, error_cls
    )


def preflight_result(res: PPResultV1, tensors: Sequence[Any], geometry: ChunkGeometry) -> Frames:
    """The leader, before sending a result: the rules, then the encoding. Raises LocalProtocolError; on
    success, the frames to send."""
    validate_result(res, geometry, LocalProtocolError)
    return encode(res, tensors)


def check_result_matches(
    res: PPResultV1, env: PPEnvelopeV1, error_cls: ErrorCls = RemoteProtocolError
) -> None:
    """Tripwires of the front: the result answers the envelope sent (action, call_id, chunk_index,
    cache_epoch) and, when ok, observed generator calls == expected."""
    for name in ("action", "call_id", "chunk_index", "cache_epoch"):
        got, sent = getattr(res, name), getattr(env, name)
        if got != sent:
            raise error_cls(f"result.{name}", f"{got!r} != sent {sent!r}", "id_mismatch")
    if res.ok and res.action is Action.INFER and res.observed_generator_calls != env.expected_generator_calls:
        raise error_cls(
            "result.observed_generator_calls",
            f"{res.observed_generator_calls} != expected {env.expected_generator_calls}",
            "tripwire_calls",
        )


def error_code_for(err: ProtocolError) -> ErrorCode:
    """The result error code the leader answers a rejected envelope with."""
    return ErrorCode.UNSUPPORTED_VERSION if err.code == "unsupported_version" else ErrorCode.INVALID_ENVELOPE


# -- TP header (leader -> workers) ---------------------------------------------------------------------


_COMPUTE_ONLY_TP = ("init_cache", "reset_cache", "do_kv_recompute", "timesteps")


def validate_tp_header(
    h: TPHeaderV1,
    geometry: ChunkGeometry,
    last_call_id: int | None = None,
    error_cls: ErrorCls = RemoteProtocolError,
) -> None:
    """Metadata rules of a TP header (workers run them on receipt)."""
    where = check_common(h, TP_ACTIONS, error_cls)
    check_call_id(h.call_id, last_call_id, where, error_cls)
    if h.action not in COMPUTE_ACTIONS:
        _expect_no_tensors(h, where, h.action.value, error_cls)
        _expect_defaults(h, _COMPUTE_ONLY_TP, where, error_cls)
        return
    check_timesteps(h.timesteps, where, error_cls)
    _check_cache_flags(h, where, error_cls)
    check_chunk_tensors(h, geometry, where, error_cls)


def preflight_tp_header(
    h: TPHeaderV1, tensors: Sequence[Any], geometry: ChunkGeometry, last_call_id: int | None = None
) -> Frames:
    """The leader, before sending a header it built itself (PING, WARMUP) to the workers: the rules, then
    the encoding. Raises LocalProtocolError; on success, the frames to send. A header relaying an envelope
    the leader validated one step before (``relay_header``) holds these rules by construction: it is only
    encoded (``tests/protocol`` pins that every valid envelope relays to a valid header)."""
    validate_tp_header(h, geometry, last_call_id, LocalProtocolError)
    return encode(h, tensors)


# -- READY (leader -> front) ---------------------------------------------------------------------------


def validate_ready(r: ReadyV1, error_cls: ErrorCls = RemoteProtocolError) -> None:
    where = check_common(r, None, error_cls)
    _expect_no_tensors(r, where, "READY", error_cls)
    if len(r.warmup_ms) != r.warmup_chunks:
        raise error_cls(
            f"{where}.warmup_ms",
            f"{len(r.warmup_ms)} timings for {r.warmup_chunks} warmup chunks",
            "warmup_count_mismatch",
        )


def preflight_ready(r: ReadyV1) -> Frames:
    """The leader, before sending READY: the rules, then the encoding; the frames to send."""
    validate_ready(r, LocalProtocolError)
    return encode(r)
