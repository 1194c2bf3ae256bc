"""The leader's relay (fsm/leader.py): warmup, validate -> relay -> infer -> reply, and its errors.
Results are checked against the preflight's own rules (validate_result, check_result_matches)."""

from __future__ import annotations

from typing import Any

import pytest
from fsm_roles_helpers import GEOMETRY, TIMESTEPS, control, infer

from pp1.fsm.base import InvalidEvent
from pp1.fsm.intents import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ORPHAN,
    AwaitEnvelope,
    Exit,
    MakeWarmupTensors,
    RecvTensors,
    RunShard,
    SendReady,
    SendResult,
    SendTP,
    WarmMesh,
    WarmPair,
)
from pp1.fsm.leader import LeaderRelayMachine, expected_calls, warmup_plan
from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.messages import T_LATENTS_OUT, Action, ErrorCode, PPEnvelopeV1, PPResultV1
from pp1.protocol.preflight import check_result_matches, validate_ready, validate_result, validate_tp_header


def serving(mesh_size: int = 2, **kw: Any) -> LeaderRelayMachine:
    r = LeaderRelayMachine(1, GEOMETRY, mesh_size, timesteps=TIMESTEPS, **kw)
    assert r.start_warmup() == [SendReady(r_ready(r)), AwaitEnvelope(until=r.watchdog_deadline_or_none())]
    assert r.state == "idle"
    return r


def r_ready(r: LeaderRelayMachine) -> Any:
    from pp1.protocol.messages import ReadyV1

    return ReadyV1(mesh_size=r.mesh_size, warmup_chunks=0, warmup_ms=(), fingerprint=r.fingerprint)


def only_result(intents: list[Any]) -> PPResultV1:
    results = [i.result for i in intents if isinstance(i, SendResult)]
    assert len(results) == 1
    return results[0]


def check_answer(res: PPResultV1, env: PPEnvelopeV1) -> None:
    validate_result(res, GEOMETRY)
    check_result_matches(res, env)


# -- warmup -------------------------------------------------------------------------------------


def test_warmup_drives_chunks_then_sends_ready() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 3, timesteps=TIMESTEPS, warmup_chunks=3, fingerprint="abc")
    intents = r.start_warmup()
    seen = []
    for i in range(3):
        assert r.state == "warming"
        assert [type(x) for x in intents] == [MakeWarmupTensors, SendTP, RunShard]  # tensors from the seed
        h = intents[0].header
        assert intents[1] == SendTP(h, with_tensors=False, digest_inputs=True)  # travels alone, its checksum stamped
        assert intents[2].header == h and h.action is Action.WARMUP and h.call_id == i
        validate_tp_header(h, GEOMETRY, seen[-1].call_id if seen else None)
        seen.append(h)
        intents = r.on_shard_done(expected_calls(h), 3 * (i + 1), {"total": 10.0 + i})
    assert r.state == "idle"
    ready, wait = intents
    assert isinstance(ready, SendReady) and wait == AwaitEnvelope(until=None)  # no watchdog: no bound
    validate_ready(ready.ready)
    assert (ready.ready.mesh_size, ready.ready.warmup_chunks, ready.ready.warmup_ms) == (3, 3, (10.0, 11.0, 12.0))
    assert ready.ready.fingerprint == "abc"
    assert [h.do_kv_recompute for h in seen] == [False, True, True]  # never on the first chunk
    assert seen[0].init_cache and not any(h.init_cache for h in seen[1:])


def test_warmup_plan_recompute_schedule_and_context() -> None:
    plan = warmup_plan(4, GEOMETRY, TIMESTEPS, recompute_every=2)
    assert [h.do_kv_recompute for h in plan] == [False, False, True, False]
    ctx = plan[2].spec("context_frames")
    assert ctx is not None and ctx.shape[1] == GEOMETRY.max_context_frames
    assert [expected_calls(h) for h in plan] == [4, 4, 5, 4]
    assert warmup_plan(2, GEOMETRY, TIMESTEPS, recompute_every=0)[1].do_kv_recompute is False


def test_warmup_without_workers_does_not_relay() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 1, timesteps=TIMESTEPS, warmup_chunks=1)
    assert [type(x) for x in r.start_warmup()] == [MakeWarmupTensors, RunShard]


def test_warmup_tripwire_fails_the_leader() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warmup_chunks=2)
    r.start_warmup()
    (ex,) = r.on_shard_done(3, 3, {})
    assert isinstance(ex, Exit) and ex.code == EXIT_FAILED and "tripwire" in ex.reason
    assert r.state == "failed" and r.failure is not None and r.failure.phase == "warming"


def test_warmup_shard_failure_fails_the_leader() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warmup_chunks=1)
    r.start_warmup()
    assert r.on_shard_failed("boom") == [Exit(EXIT_FAILED, r.failure.reason)]  # type: ignore[union-attr]
    assert r.state == "failed"


def test_envelope_before_warmup_is_invalid_event() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS)
    with pytest.raises(InvalidEvent):
        r.on_envelope(infer(0))
    assert r.state == "init"


def test_startup_warms_the_channels_then_warmup_then_serves() -> None:
    """start(): the TP PING + mesh probe; the front's PING answered, then the pair probe; then warmup."""
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warmup_chunks=1, watchdog_s=5.0, warm_timeout_s=8.0)
    ping_tp, warm = r.start(0.0)
    assert ping_tp.header.action is Action.PING and ping_tp.header.call_id == 0 and not ping_tp.with_tensors
    assert warm == WarmMesh() and r.state == "channels"
    assert r.on_mesh_warm(1.0) == [AwaitEnvelope(until=9.0)]
    (answer,) = r.on_envelope(control(Action.PING, 0), now=2.0)
    assert answer.result.ok and answer.result.action is Action.PING and r.last_call_id == 0
    assert r.on_result_sent(now=2.0) == [WarmPair()]
    make, send, run = r.on_pair_warm(3.0)
    assert isinstance(run, RunShard) and r.state == "warming"
    ready, wait = r.on_shard_done(4, 3, {"total": 1.0}, now=4.0)
    assert isinstance(ready, SendReady) and wait == AwaitEnvelope(until=9.0)  # the watchdog counts from READY
    with pytest.raises(RemoteProtocolError):  # the PING's id is taken: the front's ids start after it
        r.validate(infer(0), GEOMETRY, r.last_call_id)


def test_anything_but_the_ping_first_fails_the_leader() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warm_timeout_s=8.0)
    r.start(0.0)
    r.on_mesh_warm(1.0)
    (ex,) = r.on_envelope(infer(1), now=2.0)
    assert ex.code == EXIT_FAILED and "expected the front's PING" in ex.reason and r.state == "failed"
    r2 = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warm_timeout_s=8.0)
    r2.start(0.0)
    r2.on_mesh_warm(1.0)
    (ex2,) = r2.on_timed_out(9.0)
    assert ex2.code == EXIT_FAILED and "no PING" in ex2.reason


def test_pure_tp_has_no_front_ping_and_no_envelope_wait() -> None:
    r = LeaderRelayMachine(0, GEOMETRY, 2, timesteps=TIMESTEPS, warmup_chunks=0, front_in_process=True)
    r.start(0.0)
    ready, = r.on_mesh_warm(1.0)
    assert isinstance(ready, SendReady) and r.state == "idle"
    r.on_envelope(control(Action.NOOP, 1), now=2.0)
    assert r.on_result_sent(now=2.0) == []  # the in-process front hands the next envelope over


# -- serving ------------------------------------------------------------------------------------


def test_infer_relayed_run_and_answered() -> None:
    r = serving()
    env = infer(5, chunk_index=0, cache_epoch=0)
    intents = r.on_envelope(env, now=1.0)
    assert [type(x) for x in intents] == [RecvTensors, SendTP, RunShard]
    assert intents[0] == RecvTensors(env.tensors) and not intents[0].discard
    h = intents[1].header
    assert intents[2].header == h
    assert (h.action, h.call_id, h.chunk_index, h.cache_epoch, h.tensors) == (
        Action.INFER, 5, 0, 0, env.tensors)
    assert r.state == "running"
    (send,) = r.on_shard_done(4, 3, {"generator": 12.5})
    res = send.result
    assert res.ok and res.observed_generator_calls == 4 and res.current_start_frame == 3
    assert res.timings_ms == {"generator": 12.5}
    assert res.tensor_names() == (T_LATENTS_OUT,)
    check_answer(res, env)
    assert r.state == "replying"
    assert r.on_result_sent(now=2.0) == [AwaitEnvelope(until=None)]  # the next envelope
    assert r.state == "idle"


def test_next_chunk_with_recompute() -> None:
    r = serving()
    r.on_envelope(infer(0))
    r.on_shard_done(4, 3)
    r.on_result_sent()
    env = infer(1, chunk_index=1, recompute=True)
    assert [type(x) for x in r.on_envelope(env)] == [RecvTensors, SendTP, RunShard]
    (send,) = r.on_shard_done(5, 6)
    check_answer(send.result, env)


def test_tripwire_answers_not_ok_and_keeps_serving() -> None:
    r = serving()
    env = infer(0)
    r.on_envelope(env)
    (send,) = r.on_shard_done(3, 3)
    res = send.result
    assert not res.ok and res.error_code is ErrorCode.TRIPWIRE and res.observed_generator_calls == 3
    assert (res.call_id, res.chunk_index, res.cache_epoch) == (0, 0, 0)
    check_answer(res, env)
    r.on_result_sent()
    assert r.state == "idle" and r.failure is None


def test_noop_relayed_as_heartbeat_and_answered() -> None:
    r = serving()
    env = control(Action.NOOP, 3)
    intents = r.on_envelope(env)
    assert [type(x) for x in intents] == [SendTP, SendResult]
    assert intents[0].header.action is Action.NOOP and intents[0].header.call_id == 3
    check_answer(intents[1].result, env)
    assert intents[1].result.ok
    r.on_result_sent()
    assert r.state == "idle"


def test_noop_without_workers_is_not_relayed() -> None:
    r = serving(mesh_size=1)
    assert [type(x) for x in r.on_envelope(control(Action.NOOP, 0))] == [SendResult]


def test_ping_answered_not_relayed() -> None:
    r = serving()
    intents = r.on_envelope(control(Action.PING, 0))
    assert [type(x) for x in intents] == [SendResult] and intents[0].result.ok


def test_shutdown_relayed_answered_then_exit_0() -> None:
    r = serving()
    env = control(Action.SHUTDOWN, 9)
    intents = r.on_envelope(env)
    assert [type(x) for x in intents] == [SendTP, SendResult]
    assert intents[0].header.action is Action.SHUTDOWN
    check_answer(intents[1].result, env)
    assert r.state == "stopping"
    assert r.on_result_sent() == [Exit(EXIT_OK, "shutdown (call_id=9)")]
    assert r.state == "exited" and r.is_terminal and r.failure is None


# -- invalid envelopes: answered ok=False, never relayed ----------------------------------------


def _assert_rejected(r: LeaderRelayMachine, env: PPEnvelopeV1, code: str = "") -> PPResultV1:
    before = r.last_call_id
    intents = r.on_envelope(env)
    assert not any(isinstance(i, SendTP | RunShard) for i in intents), "an invalid envelope was relayed"
    res = only_result(intents)
    assert not res.ok and res.error_code in (ErrorCode.INVALID_ENVELOPE, ErrorCode.UNSUPPORTED_VERSION)
    assert code in res.error_message
    assert (res.call_id, res.chunk_index, res.cache_epoch) == (env.call_id, env.chunk_index, env.cache_epoch)
    validate_result(res, GEOMETRY)
    if env.tensors:
        assert intents[0] == RecvTensors(env.tensors, discard=True)  # never skip a receive
    assert r.state == "replying" and r.last_call_id == before
    r.on_result_sent()
    assert r.state == "idle"
    return res


def test_bad_shape_rejected_and_tensors_drained() -> None:
    r = serving()
    bad = infer(0, tensors=(infer(0).tensors[0], infer(0).tensors[0].model_copy(update={"name": "noise"})))
    _assert_rejected(r, bad, "bad_shape")


def test_recompute_without_context_rejected() -> None:
    r = serving()
    env = infer(0, chunk_index=1, do_kv_recompute=True, expected_generator_calls=5)
    _assert_rejected(r, env, "missing_context_frames")


def test_call_id_must_increase() -> None:
    r = serving()
    r.on_envelope(control(Action.NOOP, 4))
    r.on_result_sent()
    _assert_rejected(r, control(Action.NOOP, 4), "call_id_not_increasing")
    _assert_rejected(r, infer(2), "call_id_not_increasing")
    assert r.on_envelope(control(Action.NOOP, 5))[-1].result.ok  # the sequence goes on


def test_epoch_fence_rejects_an_older_epoch() -> None:
    r = serving()
    r.on_envelope(infer(0, cache_epoch=2, init_cache=True))
    r.on_shard_done(4, 3)
    r.on_result_sent()
    _assert_rejected(r, infer(1, chunk_index=1, cache_epoch=1), "epoch_not_increasing")


@pytest.mark.parametrize("action", [Action.WARMUP, Action.READY])
def test_actions_the_front_may_not_send(action: Action) -> None:
    _assert_rejected(serving(), control(action, 0), "")


def test_injected_validate_is_used() -> None:
    calls = []

    def validate(env: PPEnvelopeV1, geometry: Any, last_call_id: int | None) -> None:
        calls.append((env.call_id, last_call_id))
        if env.seed == 13:
            raise RemoteProtocolError("envelope.seed", "unlucky", "unlucky")

    r = serving(validate=validate)
    r.on_envelope(control(Action.NOOP, 1))
    r.on_result_sent()
    res = _assert_rejected(r, infer(2, seed=13), "unlucky")
    assert res.error_message == "[unlucky] envelope.seed: unlucky"
    assert calls == [(1, None), (2, 1)]


# -- failures while running ---------------------------------------------------------------------


def test_envelope_while_shard_runs_is_invalid_event() -> None:
    r = serving()
    r.on_envelope(infer(0))
    with pytest.raises(InvalidEvent):
        r.on_envelope(control(Action.NOOP, 1))
    assert r.state == "running"


def test_result_sent_while_idle_is_invalid_event() -> None:
    r = serving()
    with pytest.raises(InvalidEvent):
        r.on_result_sent()
    with pytest.raises(InvalidEvent):
        r.on_shard_done(4, 3)
    with pytest.raises(InvalidEvent):
        r.on_shard_failed("boom")
    assert r.state == "idle"


def test_mesh_failure_answers_then_exits_non_zero() -> None:
    r = serving()
    env = infer(0)
    r.on_envelope(env)
    intents = r.on_shard_failed("all_reduce: Connection closed by peer")
    assert [type(x) for x in intents] == [SendResult, Exit]
    res = intents[0].result
    assert not res.ok and res.error_code is ErrorCode.MESH_FAILED
    check_answer(res, env)
    assert intents[1].code == EXIT_FAILED
    assert r.state == "failed" and r.failure is not None
    assert r.failure.phase == "running" and r.failure.kind == "local" and "call_id=0" in r.failure.reason


def test_recoverable_shard_failure_keeps_serving() -> None:
    r = serving()
    env = infer(0)
    r.on_envelope(env)
    (send,) = r.on_shard_failed("bad input", recoverable=True)
    assert send.result.error_code is ErrorCode.GENERATOR_FAILED
    check_answer(send.result, env)
    r.on_result_sent()
    assert r.state == "idle"


def test_fatal_channel_error() -> None:
    r = serving()
    (ex,) = r.on_fatal("undecodable frame")
    assert ex.code == EXIT_FAILED and r.state == "failed" and r.failure.kind == "remote"  # type: ignore[union-attr]


# -- the watchdog -------------------------------------------------------------------------------


def test_watchdog_off_by_default() -> None:
    r = serving()
    assert r.watchdog_deadline() == float("inf") and r.on_tick(1e9) == []


def test_watchdog_orphan_exit_only_while_idle() -> None:
    r = serving(watchdog_s=5.0, now=0.0)
    assert r.watchdog_deadline() == 5.0
    r.on_envelope(control(Action.NOOP, 0), now=4.0)
    assert r.watchdog_deadline() == float("inf")  # not idle
    r.on_result_sent(now=4.5)
    assert r.on_tick(9.0) == [] and r.watchdog_deadline() == 9.5
    r.on_envelope(infer(1), now=9.2)
    assert r.on_tick(100.0) == []  # a shard may run long
    r.on_shard_done(4, 3)
    r.on_result_sent(now=100.0)
    (ex,) = r.on_tick(105.0)
    assert ex.code == EXIT_ORPHAN and ex.reason.startswith("orphan: no envelope for 5.0 s")
    assert r.state == "failed" and r.failure is not None and r.failure.kind == "remote"


def test_last_call_id_of_the_startup_ping() -> None:
    r = serving(last_call_id=0)
    _assert_rejected(r, infer(0), "call_id_not_increasing")
    assert r.on_envelope(infer(1))[-1].header.call_id == 1


@pytest.mark.parametrize("bad", [dict(call_id=5), dict(tensors=infer(1).tensors)])
def test_the_ping_must_carry_its_id_and_no_tensors(bad: dict[str, Any]) -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warm_timeout_s=8.0)
    r.start(0.0)
    r.on_mesh_warm(1.0)
    ping = PPEnvelopeV1.model_construct(**{**dict(control(Action.PING, 0)), **bad})
    (ex,) = r.on_envelope(ping, now=2.0)
    assert ex.code == EXIT_FAILED and "expected the front's PING" in ex.reason


def test_warmup_tripwire_on_extra_calls_fails_the_leader() -> None:
    r = LeaderRelayMachine(1, GEOMETRY, 2, timesteps=TIMESTEPS, warmup_chunks=2)
    r.start_warmup()
    (ex,) = r.on_shard_done(len(TIMESTEPS) + 1, 3, {})
    assert isinstance(ex, Exit) and ex.code == EXIT_FAILED and "tripwire" in ex.reason


@pytest.mark.parametrize("where", ["running", "replying"])
def test_an_operation_that_runs_out_outside_idle_is_fatal(where: str) -> None:
    """A send or a receive of the call in hand ran out (the channel is poisoned): never carry on."""
    r = serving(watchdog_s=5.0, now=0.0)
    r.on_envelope(infer(1), now=1.0)
    if where == "replying":
        r.on_shard_done(expected_calls(relay_tp(infer(1))), 3)
    assert r.state == where
    (ex,) = r.on_timed_out(2.0)
    assert ex.code == EXIT_FAILED and r.state == "failed" and "ran out of time" in ex.reason


def relay_tp(env: PPEnvelopeV1) -> Any:
    from pp1.protocol.messages import relay_header

    return relay_header(env)
