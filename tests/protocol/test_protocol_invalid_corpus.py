"""A corpus of invalid messages: each is rejected with its own code and field path, by the sender
(LocalProtocolError, nothing emitted) and, for metadata rules, by the receiver too
(RemoteProtocolError, same code and field)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from pp1.protocol.codec import Frames, alloc_tensors, encode
from pp1.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import (
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
    relay_header,
)
from pp1.protocol.preflight import (
    CODES,
    check_result_matches,
    preflight_envelope,
    preflight_ready,
    preflight_result,
    preflight_tp_header,
    validate_envelope,
    validate_ready,
    validate_result,
    validate_tp_header,
)
from pp1.protocol.tensors import TensorSpec

G = ChunkGeometry(
    latent_channels=4,
    latent_frames=3,
    latent_height=2,
    latent_width=3,
    text_len=5,
    text_dim=8,
    max_context_frames=6,
)
LAST_CALL = 10
TS = (1000, 750, 500, 250)


def spec(name: str, shape: tuple[int, ...], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


COND = spec(T_CONDITIONING, G.conditioning_shape())
NOISE = spec(T_NOISE, G.noise_shape())
CTX2 = spec(T_CONTEXT, G.context_shape(2))
LAT = spec(T_LATENTS_OUT, G.latents_shape())

ENV = PPEnvelopeV1(
    action=Action.INFER,
    call_id=LAST_CALL + 1,
    chunk_index=4,
    cache_epoch=2,
    num_denoising_steps=4,
    timesteps=TS,
    expected_generator_calls=4,
    seed=7,
    tensors=(COND, NOISE),
)
ENV_RC = ENV.model_copy(
    update={"do_kv_recompute": True, "expected_generator_calls": 5, "tensors": (COND, NOISE, CTX2)}
)
RES = PPResultV1(
    action=Action.INFER,
    ok=True,
    call_id=11,
    chunk_index=4,
    cache_epoch=2,
    observed_generator_calls=4,
    tensors=(LAT,),
)
FAILED_RES = PPResultV1(
    action=Action.INFER, ok=False, error_code=ErrorCode.GENERATOR_FAILED, error_message="boom", call_id=11
)
TP = relay_header(ENV)
READY = ReadyV1(mesh_size=2, warmup_chunks=1, warmup_ms=(12.5,))


def env(**kw: Any) -> PPEnvelopeV1:
    """ENV with fields replaced, without validation (model_copy), so any value can be tried."""
    return ENV.model_copy(update=kw)


def rc(**kw: Any) -> PPEnvelopeV1:
    return ENV_RC.model_copy(update=kw)


def noop(action: Action = Action.NOOP, **kw: Any) -> PPEnvelopeV1:
    return PPEnvelopeV1(action=action, call_id=LAST_CALL + 1).model_copy(update=kw)


def res(**kw: Any) -> PPResultV1:
    return RES.model_copy(update=kw)


def tp(**kw: Any) -> TPHeaderV1:
    return TP.model_copy(update=kw)


# -- a sender that preflights, encodes, then records what it "sent" ------------------------------------


@dataclass
class FakeSender:
    """Stands in for a channel: preflight, encode, then record the frames. A failure before the
    record leaves ``sent`` empty: nothing reached the wire."""

    geometry: ChunkGeometry
    last_call_id: int | None = LAST_CALL
    last_cache_epoch: int | None = None
    sent: list[Frames] = field(default_factory=list)

    def send(self, msg: Any, tensors: list[torch.Tensor]) -> None:
        if isinstance(msg, PPEnvelopeV1):
            preflight_envelope(
                msg, tensors, self.geometry, self.last_call_id, last_cache_epoch=self.last_cache_epoch
            )
        elif isinstance(msg, PPResultV1):
            preflight_result(msg, tensors, self.geometry)
        elif isinstance(msg, TPHeaderV1):
            preflight_tp_header(msg, tensors, self.geometry, self.last_call_id)
        else:
            preflight_ready(msg)
        frames = encode(msg, tensors)
        self.sent.append(frames)  # the commitment point: only now would bytes go out


def receive_check(msg: Any, sender: FakeSender) -> None:
    """The receiver's metadata rules for the same message."""
    if isinstance(msg, PPEnvelopeV1):
        validate_envelope(msg, sender.geometry, sender.last_call_id, last_cache_epoch=sender.last_cache_epoch)
    elif isinstance(msg, PPResultV1):
        validate_result(msg, sender.geometry)
    elif isinstance(msg, TPHeaderV1):
        validate_tp_header(msg, sender.geometry, sender.last_call_id)
    else:
        validate_ready(msg)


# -- the corpus ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    msg: Any
    code: str
    field: str
    tensors: Callable[[Any], list[Any]] | None = None  # default: matching tensors for msg.tensors
    meta_rule: bool = True  # the receiver's validate_* rejects it too (metadata rules, not the codec's or tensors)
    last_cache_epoch: int | None = None


def _tensors_default(msg: Any) -> list[torch.Tensor]:
    return [t.zero_() for t in alloc_tensors(msg.tensors)]


def _swap(i: int, t: Any) -> Callable[[Any], list[Any]]:
    def build(msg: Any) -> list[Any]:
        out: list[Any] = _tensors_default(msg)
        out[i] = t
        return out

    return build


CORPUS: list[Case] = [
    # envelope: ids and steps
    Case("call_id_equal", env(call_id=LAST_CALL), "call_id_not_increasing", "envelope.call_id"),
    Case("call_id_back", env(call_id=3), "call_id_not_increasing", "envelope.call_id"),
    Case("noop_call_id_back", noop(call_id=LAST_CALL), "call_id_not_increasing", "envelope.call_id"),
    Case(
        "zero_steps",
        env(num_denoising_steps=0, timesteps=(), expected_generator_calls=0),
        "no_steps",
        "envelope.num_denoising_steps",
    ),
    Case("steps_vs_timesteps", env(num_denoising_steps=3), "steps_mismatch", "envelope.num_denoising_steps"),
    Case(
        "timesteps_flat",
        env(timesteps=(1000, 750, 750, 250)),
        "timesteps_not_decreasing",
        "envelope.timesteps[2]",
    ),
    Case(
        "timesteps_rising",
        env(timesteps=(250, 500, 750, 1000)),
        "timesteps_not_decreasing",
        "envelope.timesteps[1]",
    ),
    Case(
        "timestep_over_1000",
        env(timesteps=(1001, 750, 500, 250)),
        "timestep_out_of_range",
        "envelope.timesteps[0]",
    ),
    Case(
        "timestep_zero", env(timesteps=(1000, 750, 500, 0)), "timestep_out_of_range", "envelope.timesteps[3]"
    ),
    Case(
        "calls_without_recompute",
        env(expected_generator_calls=5),
        "calls_mismatch",
        "envelope.expected_generator_calls",
    ),
    Case(
        "calls_with_recompute",
        rc(expected_generator_calls=4),
        "calls_mismatch",
        "envelope.expected_generator_calls",
    ),
    # envelope: cache flags and epochs
    Case("recompute_on_init", rc(init_cache=True), "recompute_on_init", "envelope.do_kv_recompute"),
    Case(
        "epoch_back", env(cache_epoch=1), "epoch_not_increasing", "envelope.cache_epoch", last_cache_epoch=2
    ),
    Case(
        "new_epoch_without_init",
        env(cache_epoch=3),
        "epoch_without_init",
        "envelope.init_cache",
        last_cache_epoch=2,
    ),
    # envelope: tensor specs
    Case(
        "recompute_without_context", rc(tensors=(COND, NOISE)), "missing_context_frames", "envelope.tensors"
    ),
    Case(
        "context_without_recompute",
        env(tensors=(COND, NOISE, CTX2)),
        "unexpected_context_frames",
        "envelope.tensors[2]",
    ),
    Case(
        "zero_context_frames",
        rc(tensors=(COND, NOISE, spec(T_CONTEXT, G.context_shape(0)))),
        "bad_context_frames",
        "envelope.tensors[2].shape[1]",
    ),
    Case(
        "too_many_context_frames",
        rc(tensors=(COND, NOISE, spec(T_CONTEXT, G.context_shape(7)))),
        "bad_context_frames",
        "envelope.tensors[2].shape[1]",
    ),
    Case(
        "context_wrong_height",
        rc(tensors=(COND, NOISE, spec(T_CONTEXT, (4, 2, 9, 3)))),
        "bad_shape",
        "envelope.tensors[2].shape",
    ),
    Case(
        "context_3d",
        rc(tensors=(COND, NOISE, spec(T_CONTEXT, (4, 2, 6)))),
        "bad_shape",
        "envelope.tensors[2].shape",
    ),
    Case(
        "context_dtype",
        rc(tensors=(COND, NOISE, spec(T_CONTEXT, G.context_shape(2), "float16"))),
        "bad_dtype",
        "envelope.tensors[2].dtype",
    ),
    Case("missing_conditioning", env(tensors=(NOISE,)), "missing_conditioning", "envelope.tensors"),
    Case("missing_noise", env(tensors=(COND,)), "missing_noise", "envelope.tensors"),
    Case("no_tensors", env(tensors=()), "missing_conditioning", "envelope.tensors"),
    Case("swapped_order", env(tensors=(NOISE, COND)), "bad_tensor_order", "envelope.tensors"),
    Case(
        "stray_tensor",
        env(tensors=(COND, NOISE, spec("mask", (3,)))),
        "unexpected_tensor",
        "envelope.tensors[2].name",
    ),
    Case(
        "duplicate_noise", env(tensors=(COND, NOISE, NOISE)), "duplicate_tensor", "envelope.tensors[2].name"
    ),
    Case(
        "noise_shape",
        env(tensors=(COND, spec(T_NOISE, (4, 2, 2, 3)))),
        "bad_shape",
        "envelope.tensors[1].shape",
    ),
    Case(
        "conditioning_shape",
        env(tensors=(spec(T_CONDITIONING, (5, 9)), NOISE)),
        "bad_shape",
        "envelope.tensors[0].shape",
    ),
    Case(
        "conditioning_dtype",
        env(tensors=(spec(T_CONDITIONING, (5, 8), "bfloat16"), NOISE)),
        "bad_dtype",
        "envelope.tensors[0].dtype",
    ),
    # envelope: actions that carry nothing
    Case("noop_with_tensor", noop(tensors=(COND,)), "unexpected_tensor", "envelope.tensors[0]"),
    Case(
        "ping_with_timesteps",
        noop(Action.PING, timesteps=(1000,)),
        "unexpected_infer_field",
        "envelope.timesteps",
    ),
    Case(
        "shutdown_with_recompute",
        noop(Action.SHUTDOWN, do_kv_recompute=True),
        "unexpected_infer_field",
        "envelope.do_kv_recompute",
    ),
    Case("noop_with_init", noop(init_cache=True), "unexpected_infer_field", "envelope.init_cache"),
    Case(
        "noop_with_steps",
        noop(num_denoising_steps=2),
        "unexpected_infer_field",
        "envelope.num_denoising_steps",
    ),
    Case(
        "noop_with_calls",
        noop(expected_generator_calls=1),
        "unexpected_infer_field",
        "envelope.expected_generator_calls",
    ),
    Case("envelope_warmup", noop(Action.WARMUP), "bad_action", "envelope.action"),
    Case("envelope_ready", noop(Action.READY), "bad_action", "envelope.action"),
    Case(
        "envelope_version_2",
        PPEnvelopeV1.model_construct(**{**dict(ENV), "version": 2}),
        "unsupported_version",
        "envelope.version",
    ),
    # envelope: the tensors themselves (sender only: a receiver allocates from the specs)
    Case(
        "tensor_dtype",
        env(),
        "bad_dtype",
        "envelope.tensors[1].dtype",
        tensors=_swap(1, torch.zeros(G.noise_shape(), dtype=torch.bfloat16)),
        meta_rule=False,
    ),
    Case(
        "tensor_shape",
        env(),
        "bad_shape",
        "envelope.tensors[0].shape",
        tensors=_swap(0, torch.zeros(5, 7)),
        meta_rule=False,
    ),
    Case(
        "tensor_missing",
        env(),
        "tensor_count_mismatch",
        "envelope.tensors",
        tensors=lambda m: _tensors_default(m)[:1],
        meta_rule=False,
    ),
    Case(
        "tensor_extra",
        env(),
        "tensor_count_mismatch",
        "envelope.tensors",
        tensors=lambda m: [*_tensors_default(m), torch.zeros(1)],
        meta_rule=False,
    ),
    Case(
        "tensor_numpy",
        env(),
        "not_a_tensor",
        "envelope.tensors[1]",
        tensors=_swap(1, np.zeros(G.noise_shape(), dtype=np.float32)),
        meta_rule=False,
    ),
    Case(
        "context_tensor_frames",
        rc(),
        "bad_shape",
        "envelope.tensors[2].shape",
        tensors=_swap(2, torch.zeros(G.context_shape(3))),
        meta_rule=False,
    ),
    # result
    Case("ok_without_latents", res(tensors=()), "missing_latents_out", "result.tensors"),
    Case(
        "ok_latents_shape",
        res(tensors=(spec(T_LATENTS_OUT, (4, 2, 2, 3)),)),
        "bad_shape",
        "result.tensors[0].shape",
    ),
    Case(
        "ok_latents_dtype",
        res(tensors=(spec(T_LATENTS_OUT, G.latents_shape(), "float16"),)),
        "bad_dtype",
        "result.tensors[0].dtype",
    ),
    Case(
        "ok_extra_tensor", res(tensors=(LAT, spec("debug", (1,)))), "unexpected_tensor", "result.tensors[1]"
    ),
    Case("ok_with_error_code", res(error_code=ErrorCode.TRIPWIRE), "error_code_on_ok", "result.error_code"),
    Case(
        "failed_without_code",
        FAILED_RES.model_copy(update={"error_code": None}),
        "missing_error_code",
        "result.error_code",
    ),
    Case(
        "failed_with_latents",
        FAILED_RES.model_copy(update={"tensors": (LAT,)}),
        "unexpected_tensor",
        "result.tensors[0]",
    ),
    Case("noop_result_tensor", res(action=Action.NOOP), "unexpected_tensor", "result.tensors[0]"),
    Case("result_warmup", res(action=Action.WARMUP, tensors=()), "bad_action", "result.action"),
    # the codec's rules (what JSON cannot carry, sizes): the sender's encode refuses them; a receiver meets
    # them in decode (test_protocol_corrupt_frames), never in validate_*
    Case(
        "timing_nan",
        res(timings_ms={"denoise": float("nan")}),
        "non_finite_float",
        "result.timings_ms.denoise",
        meta_rule=False,
    ),
    Case(
        "timing_inf",
        res(timings_ms={"decode": float("inf")}),
        "non_finite_float",
        "result.timings_ms.decode",
        meta_rule=False,
    ),
    Case(
        "meta_too_large",
        FAILED_RES.model_copy(update={"error_message": "x" * 70_000}),
        "meta_too_large",
        "result",
        meta_rule=False,
    ),
    Case(
        "latents_tensor_dtype",
        res(),
        "bad_dtype",
        "result.tensors[0].dtype",
        tensors=_swap(0, torch.zeros(G.latents_shape(), dtype=torch.float64)),
        meta_rule=False,
    ),
    # TP header
    Case("tp_call_id_back", tp(call_id=LAST_CALL), "call_id_not_increasing", "tp_header.call_id"),
    Case("tp_no_steps", tp(timesteps=()), "no_steps", "tp_header.timesteps"),
    Case(
        "tp_warmup_rising",
        tp(action=Action.WARMUP, timesteps=(1, 2)),
        "timesteps_not_decreasing",
        "tp_header.timesteps[1]",
    ),
    Case(
        "tp_recompute_without_context",
        tp(do_kv_recompute=True),
        "missing_context_frames",
        "tp_header.tensors",
    ),
    Case(
        "tp_noop_reset",
        tp(action=Action.NOOP, tensors=(), timesteps=(), reset_cache=True),
        "unexpected_infer_field",
        "tp_header.reset_cache",
    ),
    Case(
        "tp_shutdown_tensors",
        tp(action=Action.SHUTDOWN, timesteps=()),
        "unexpected_tensor",
        "tp_header.tensors[0]",
    ),
    Case("tp_ready", tp(action=Action.READY), "bad_action", "tp_header.action"),
    Case(
        "tp_tensor_shape",
        tp(),
        "bad_shape",
        "tp_header.tensors[1].shape",
        tensors=_swap(1, torch.zeros(1, 2, 3)),
        meta_rule=False,
    ),
    # READY
    Case(
        "ready_count", READY.model_copy(update={"warmup_ms": ()}), "warmup_count_mismatch", "ready.warmup_ms"
    ),
    Case(
        "ready_tensor", READY.model_copy(update={"tensors": (LAT,)}), "unexpected_tensor", "ready.tensors[0]"
    ),
    Case(
        "ready_nan",
        READY.model_copy(update={"warmup_ms": (float("nan"),)}),
        "non_finite_float",
        "ready.warmup_ms[0]",
        meta_rule=False,  # the codec's rule (above)
    ),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_sender_rejects_and_emits_nothing(case: Case) -> None:
    sender = FakeSender(G, last_cache_epoch=case.last_cache_epoch)
    tensors = (case.tensors or _tensors_default)(case.msg)
    with pytest.raises(LocalProtocolError) as info:
        sender.send(case.msg, tensors)
    err = info.value
    assert (err.code, err.field) == (case.code, case.field), str(err)
    assert type(err) is LocalProtocolError
    assert err.code in CODES or err.code in {"tensor_count_mismatch", "not_a_tensor"}
    assert sender.sent == []


@pytest.mark.parametrize(
    "case", [c for c in CORPUS if c.meta_rule], ids=[c.id for c in CORPUS if c.meta_rule]
)
def test_receiver_rejects_with_same_code(case: Case) -> None:
    sender = FakeSender(G, last_cache_epoch=case.last_cache_epoch)
    with pytest.raises(RemoteProtocolError) as info:
        receive_check(case.msg, sender)
    assert (info.value.code, info.value.field) == (case.code, case.field), str(info.value)


def test_corpus_covers_every_preflight_code() -> None:
    covered = {c.code for c in CORPUS} | {
        "id_mismatch",
        "tripwire_calls",
        "too_many_tensors",
        "payload_too_large",
    }
    covered |= {"not_serialisable"}  # exercised in test_protocol_corrupt_frames
    assert set(CODES) <= covered, sorted(set(CODES) - covered)


def test_valid_base_messages_pass() -> None:
    sender = FakeSender(G)
    for msg in (ENV, ENV_RC, noop(), noop(Action.PING), noop(Action.SHUTDOWN), RES, FAILED_RES, TP, READY):
        sender.send(msg, _tensors_default(msg))
        receive_check(msg, sender)
    assert len(sender.sent) == 9
    # init_cache on its own (a reset) and reset_cache with a recompute are both allowed
    sender.send(env(init_cache=True, cache_epoch=3), _tensors_default(ENV))
    sender.send(rc(reset_cache=True), _tensors_default(ENV_RC))
    FakeSender(G, last_cache_epoch=2).send(env(init_cache=True, cache_epoch=3), _tensors_default(ENV))


def test_first_envelope_has_no_last_call_id() -> None:
    FakeSender(G, last_call_id=None).send(env(call_id=0), _tensors_default(ENV))


@pytest.mark.parametrize(
    ("result", "code", "field_"),
    [
        (res(call_id=12), "id_mismatch", "result.call_id"),
        (res(chunk_index=5), "id_mismatch", "result.chunk_index"),
        (res(cache_epoch=1), "id_mismatch", "result.cache_epoch"),
        (res(action=Action.NOOP), "id_mismatch", "result.action"),
        (res(observed_generator_calls=5), "tripwire_calls", "result.observed_generator_calls"),
    ],
)
def test_result_tripwires(result: PPResultV1, code: str, field_: str) -> None:
    sent = env(call_id=11)
    with pytest.raises(RemoteProtocolError) as info:
        check_result_matches(result, sent)
    assert (info.value.code, info.value.field) == (code, field_)
    check_result_matches(res(), sent)
    check_result_matches(FAILED_RES.model_copy(update={"chunk_index": 4, "cache_epoch": 2}), sent)


def test_error_class_is_passed_not_duplicated() -> None:
    """The same rule object raises whichever class it is given."""
    bad = env(call_id=1)
    for cls in (LocalProtocolError, RemoteProtocolError):
        with pytest.raises(cls) as info:
            validate_envelope(bad, G, LAST_CALL, cls)
        assert isinstance(info.value, ProtocolError) and info.value.code == "call_id_not_increasing"
