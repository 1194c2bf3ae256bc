"""Unit tests of the front's chunk machine (fsm/chunk.py)."""

from __future__ import annotations

import pytest
from chunk_helpers import TIMESTEPS, answer, machine, run_chunk, send

from pp1.fsm.base import InvalidEvent
from pp1.fsm.chunk import (
    CHUNK_STATES,
    ChunkMachine,
    Verdict,
    envelope_from_plan,
    p99,
    recompute_due,
)
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.messages import Action, ErrorCode, PPEnvelopeV1
from pp1.protocol.schedule import FIRST_CALL_ID, PING_CALL_ID
from pp1.protocol.tensors import TensorSpec

# -- normal run ---------------------------------------------------------------------------------


def test_normal_run_ids_flags_and_kv() -> None:
    m = machine(recompute_every=0)
    seen = []
    for k in range(5):
        plan, d = run_chunk(m, now=float(k))
        assert d.verdict is Verdict.EMIT and m.state == "idle"
        assert (plan.call_id, plan.chunk_index, plan.cache_epoch) == (FIRST_CALL_ID + k, k, 0)
        assert plan.init_cache == (k == 0) and not plan.reset_cache
        assert plan.expected_generator_calls == len(TIMESTEPS) and plan.timesteps == TIMESTEPS
        assert m.is_current(d.cache_epoch)
        seen.append(m.kv.state)
    assert seen == ["filling", "rolling", "rolling", "rolling", "rolling"]
    assert m.kv.cached_frames == 6 and m.kv.timeline_frames == 15
    assert m.stats.emitted == 5


def test_overlap_depth_one() -> None:
    m = machine()
    send(m)
    for call in (lambda: m.plan_next(0.0), lambda: m.plan_noop(0.0), m.plan_shutdown):
        with pytest.raises(InvalidEvent):
            call()
    assert m.state == "in_flight"


def test_envelope_from_plan() -> None:
    m = machine()
    run_chunk(m)
    plan = m.plan_next(1.0)
    specs = [TensorSpec(name="conditioning", dtype="float32", shape=(4, 8))]
    env = envelope_from_plan(plan, specs)
    assert isinstance(env, PPEnvelopeV1) and type(env) is PPEnvelopeV1  # the wire type, without the plan's extras
    assert (env.action, env.call_id, env.chunk_index, env.cache_epoch) == (Action.INFER, FIRST_CALL_ID + 1, 1, 0)
    assert env.do_kv_recompute and env.expected_generator_calls == 5 and env.num_denoising_steps == 4
    assert env.tensor_names() == ("conditioning",)


# -- recompute schedule -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_recompute_schedule(k: int) -> None:
    m = machine(recompute_every=k)
    flags = []
    for i in range(7):
        plan, _ = run_chunk(m, now=float(i))
        flags.append(plan.do_kv_recompute)
        assert plan.expected_generator_calls == len(TIMESTEPS) + int(plan.do_kv_recompute)
        assert (plan.context_source is not None) == plan.do_kv_recompute
        if plan.do_kv_recompute:
            assert plan.context_frames == min(3 * i, 6)
        else:
            assert plan.context_frames == 0
    assert flags == [recompute_due(i, k) for i in range(7)]
    assert flags[0] is False
    if k == 0:
        assert not any(flags)
    else:
        assert flags == [i > 0 and i % k == 0 for i in range(7)]
    # never on the first chunk of a new epoch either
    m.hard_cut("prompt")
    plans = [run_chunk(m, now=10.0 + i)[0] for i in range(4)]
    assert [p.chunk_index for p in plans] == [0, 1, 2, 3]
    assert [p.do_kv_recompute for p in plans] == [recompute_due(i, k) for i in range(4)]


def test_kv_recomputing_while_in_flight() -> None:
    m = machine(recompute_every=1)
    run_chunk(m)
    assert m.kv.state == "needs_recompute"
    plan = m.plan_next(1.0)
    assert m.kv.state == "needs_recompute"  # not sent yet
    m.on_sent(1.0)
    assert m.kv.state == "recomputing"
    m.on_result(answer(plan), 1.1)
    assert m.kv.state == "needs_recompute" and m.stats.recomputes == 1


# -- hard cut -----------------------------------------------------------------------------------


def test_hard_cut_idle() -> None:
    m = machine()
    run_chunk(m)
    run_chunk(m)
    assert m.hard_cut("prompt reset") == "idle"
    assert m.cache_epoch == 1 and m.kv.state == "empty"
    plan, d = run_chunk(m)
    assert (plan.chunk_index, plan.cache_epoch, plan.init_cache, plan.reset_cache) == (0, 1, True, True)
    assert not plan.do_kv_recompute and d.verdict is Verdict.EMIT
    plan2, _ = run_chunk(m)
    assert not plan2.reset_cache and not plan2.init_cache  # reset only on the cut's first chunk


def test_hard_cut_with_chunk_in_flight_discards_then_submits_new_epoch() -> None:
    m = machine()
    run_chunk(m)
    old = send(m, 1.0)
    assert m.hard_cut("prompt reset") == "cutting"
    assert m.waiting and m.deadline_at() is not None  # still waits for it, under the deadline
    with pytest.raises(InvalidEvent):
        m.plan_next(1.0)  # the old result must be received first
    d = m.on_result(answer(old), 1.2)
    assert d.verdict is Verdict.DISCARD_STALE and d.cache_epoch == 0 and not m.is_current(d.cache_epoch)
    assert m.state == "idle" and m.stats.discarded_stale == 1 and m.stats.emitted == 1
    new = m.plan_next(1.3)
    assert (new.chunk_index, new.cache_epoch, new.reset_cache, new.call_id) == (0, 1, True, old.call_id + 1)


def test_stale_failure_is_discarded_not_counted() -> None:
    m = machine()
    old = send(m)
    m.hard_cut("prompt")
    d = m.on_result(answer(old, ok=False), 0.1)
    assert d.verdict is Verdict.DISCARD_STALE and m.consecutive_failures == 0


def test_hard_cut_while_building_makes_envelope_stale() -> None:
    m = machine()
    run_chunk(m)
    plan = m.plan_next(1.0)
    m.hard_cut("prompt")
    assert m.state == "building"
    assert m.on_sent(1.0) == "cutting"
    assert m.kv.state == "empty"  # the stale chunk's recompute did not touch the new epoch's cache
    assert m.on_result(answer(plan), 1.1).verdict is Verdict.DISCARD_STALE
    assert m.plan_next(2.0).reset_cache


def test_two_cuts_in_flight() -> None:
    m = machine()
    p = send(m)
    m.hard_cut("a")
    m.hard_cut("b")
    assert m.cache_epoch == 2
    assert m.on_result(answer(p), 0.1).verdict is Verdict.DISCARD_STALE
    assert m.plan_next(0.2).cache_epoch == 2


def test_decode_after_cut_is_not_shown() -> None:
    m = machine()
    _, d = run_chunk(m)
    assert m.is_current(d.cache_epoch)
    m.hard_cut("prompt during decode")
    assert not m.is_current(d.cache_epoch)


# -- retry once, then fail ------------------------------------------------------------------------


def test_retry_once_then_fail() -> None:
    m = machine()
    run_chunk(m)
    plan, d = run_chunk(m, ok=False)
    assert d.verdict is Verdict.RETRY and m.state == "idle" and m.cache_epoch == 1
    retry, d2 = run_chunk(m, ok=False)
    assert (retry.chunk_index, retry.cache_epoch, retry.reset_cache) == (0, 1, True)
    assert d2.verdict is Verdict.FAIL and m.state == "failed"
    assert d2.cause is not None and d2.cause.kind == "remote" and "second failure" in d2.cause.reason
    assert isinstance(d2.error, RemoteProtocolError)
    with pytest.raises(RemoteProtocolError):
        d2.raise_if_failed()
    assert not m.poisoned and m.farewell_plan() is not None  # received: best-effort SHUTDOWN allowed


def test_success_resets_failure_count() -> None:
    m = machine()
    for _ in range(3):
        assert run_chunk(m, ok=False)[1].verdict is Verdict.RETRY
        assert run_chunk(m)[1].verdict is Verdict.EMIT
    assert m.stats.retries == 3 and m.state == "idle"


@pytest.mark.parametrize("code", [ErrorCode.MESH_FAILED, ErrorCode.UNSUPPORTED_VERSION])
def test_fatal_codes_fail_at_once(code: ErrorCode) -> None:
    m = machine()
    plan = send(m)
    d = m.on_result(answer(plan, ok=False, error_code=code), 0.1)
    assert d.verdict is Verdict.FAIL and m.state == "failed"


# -- tripwires ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("call_id", 99), ("chunk_index", 7), ("cache_epoch", 3), ("action", Action.NOOP),
     ("observed_generator_calls", 3)],
)
def test_tripwires(field: str, value: object) -> None:
    m = machine()
    plan = send(m)
    d = m.on_result(answer(plan, **{field: value}), 0.1)
    assert d.verdict is Verdict.FAIL and m.state == "failed" and m.kv.state == "failed"
    assert isinstance(d.error, RemoteProtocolError)
    assert d.error.code == ("tripwire_calls" if field == "observed_generator_calls" else "id_mismatch")
    assert d.error.field == f"result.{field}"
    assert d.cause is not None and d.cause.kind == "remote" and d.cause.phase == "in_flight"


def test_generator_calls_not_checked_on_failure_or_noop() -> None:
    m = machine()
    plan = m.plan_noop(0.0)
    m.on_sent(0.0)
    assert m.on_result(answer(plan, observed_generator_calls=0), 0.1).verdict is Verdict.ACK
    plan = send(m)
    assert m.on_result(answer(plan, ok=False, observed_generator_calls=1), 0.2).verdict is Verdict.RETRY


def test_tripwire_on_discarded_result_still_fails() -> None:
    m = machine()
    plan = send(m)
    m.hard_cut("prompt")
    d = m.on_result(answer(plan, call_id=plan.call_id + 1), 0.1)
    assert d.verdict is Verdict.FAIL


def test_unsolicited_result_fails_remote() -> None:
    m = machine()
    plan, _ = run_chunk(m)
    d = m.on_result(answer(plan), 1.0)
    assert d.verdict is Verdict.FAIL and d.cause is not None and d.cause.kind == "remote"
    with pytest.raises(LocalProtocolError):
        m.on_result(answer(plan), 1.0)  # terminal: the engine must not feed results any more


# -- deadline -----------------------------------------------------------------------------------


def test_p99() -> None:
    assert p99([]) == 0.0
    assert p99([1.0]) == 1.0
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([float(i) for i in range(1, 201)]) == 198.0


def test_deadline_computation() -> None:
    m = machine(deadline_floor_s=2.0, deadline_factor=4.0, deadline_samples=10)
    assert m.deadline_s() == 2.0 and m.deadline_at() is None
    run_chunk(m, now=0.0, rtt=0.1)
    assert m.deadline_s() == 2.0  # 4 x 0.1 < floor
    run_chunk(m, now=1.0, rtt=1.0)
    assert m.deadline_s() == pytest.approx(4.0)  # 4 x p99 = 4 x 1.0
    for i in range(10):  # the window rolls: the slow sample leaves
        run_chunk(m, now=10.0 + i, rtt=0.25)
    assert m.deadline_s() == 2.0
    p = m.plan_next(50.0)
    assert m.deadline_at() is None  # not sent yet: nothing to wait for
    m.on_sent(50.0)
    assert m.deadline_at() == pytest.approx(52.0)
    m.on_result(answer(p), 50.5)


def test_deadline_missed_fails_and_poisons() -> None:
    m = machine(deadline_floor_s=5.0)
    plan = send(m, 100.0)
    with pytest.raises(LocalProtocolError):
        m.on_deadline_missed(104.0)
    assert m.state == "in_flight"
    d = m.on_deadline_missed(105.0)
    assert d.verdict is Verdict.FAIL and d.call_id == plan.call_id and m.poisoned
    assert d.error is not None and d.error.code == "deadline" and d.cause is not None and d.cause.kind == "remote"
    assert m.farewell_plan() is None


def test_deadline_without_anything_in_flight_is_an_error() -> None:
    m = machine()
    with pytest.raises(LocalProtocolError):
        m.on_deadline_missed(1e9)


@pytest.mark.parametrize("state_setup", ["cutting", "draining", "stopping"])
def test_every_waiting_state_has_a_deadline(state_setup: str) -> None:
    m = machine()
    if state_setup == "stopping":
        m.plan_shutdown()
        assert m.deadline_at() is None
    else:
        send(m)
        (m.hard_cut if state_setup == "cutting" else lambda _r: m.request_stop())("x")
    m.on_sent(0.0) if state_setup == "stopping" else None
    assert m.state == state_setup and m.waiting and m.deadline_at() == 10.0


# -- heartbeat, stop, abort ---------------------------------------------------------------------


def test_noop_heartbeat() -> None:
    m = machine(heartbeat_s=1.0)
    assert m.noop_due(0.0)
    plan = m.plan_noop(0.0)
    assert plan.action is Action.NOOP and plan.expected_generator_calls == 0
    assert not m.noop_due(5.0)  # not while anything is out
    m.on_sent(0.0)
    assert m.on_result(answer(plan), 0.1).verdict is Verdict.ACK
    assert not m.noop_due(0.5) and m.noop_due(1.1)
    nxt = m.plan_next(1.2)
    assert nxt.call_id == plan.call_id + 1 and nxt.chunk_index == 0  # one counter for all


def test_stop_when_idle() -> None:
    m = machine()
    run_chunk(m)
    assert m.request_stop() == "closing"
    with pytest.raises(InvalidEvent):
        m.plan_next(1.0)
    with pytest.raises(InvalidEvent):
        m.plan_noop(1.0)
    plan = m.plan_shutdown()
    assert plan.action is Action.SHUTDOWN and m.state == "stopping"
    m.on_sent(1.0)
    d = m.on_result(answer(plan), 1.1)
    assert d.verdict is Verdict.STOPPED and m.state == "stopped" and m.is_terminal


def test_stop_drains_in_flight_chunk() -> None:
    m = machine()
    plan = send(m)
    assert m.request_stop() == "draining"
    assert m.request_stop() == "draining"  # idempotent
    d = m.on_result(answer(plan), 0.1)
    assert d.verdict is Verdict.EMIT and m.state == "closing"
    m.plan_shutdown()


def test_stop_drains_failed_chunk_without_retry() -> None:
    m = machine()
    plan = send(m)
    m.request_stop()
    d = m.on_result(answer(plan, ok=False), 0.1)
    assert d.verdict is Verdict.DROP and m.state == "closing" and m.cache_epoch == 0


def test_stop_and_cut_while_building() -> None:
    m = machine()
    plan = m.plan_next(0.0)
    m.request_stop()
    assert m.state == "building"
    assert m.on_sent(0.0) == "draining"
    assert m.on_result(answer(plan), 0.1).verdict is Verdict.EMIT
    m2 = machine()
    m2.plan_next(0.0)
    m2.request_stop()
    assert m2.abort_plan("preflight said no") == "closing"


def test_abort_plan_sends_nothing_and_keeps_schedule() -> None:
    m = machine()
    run_chunk(m)
    p = m.plan_next(1.0)
    assert p.do_kv_recompute
    assert m.abort_plan("recompute needs context frames") == "idle"
    assert m.kv.state == "needs_recompute"
    q = m.plan_next(1.0)
    assert q.call_id == p.call_id + 1 and q.chunk_index == p.chunk_index and q.do_kv_recompute
    m.on_sent(1.0)
    with pytest.raises(LocalProtocolError):
        m.on_sent(1.0)


def test_shutdown_that_cannot_be_built_fails_locally() -> None:
    m = machine()
    m.plan_shutdown()
    m.abort_plan("codec")
    assert m.state == "failed" and m.failure is not None and m.failure.kind == "local"


def test_poison() -> None:
    """A broken channel is the peer's fault (issue 11: it was recorded as the front's own)."""
    m = machine(peer_rank=1)
    send(m)
    d = m.poison("send broke mid-message")
    assert d.verdict is Verdict.FAIL and m.poisoned and m.failure is not None and m.failure.kind == "remote"
    assert m.failure.blame == 1 and m.failure.at_fault == 1 and "remote: rank 1" in str(m.failure)
    assert m.farewell_plan() is None


def test_cut_not_allowed_while_stopping_or_terminal() -> None:
    m = machine()
    m.plan_shutdown()
    with pytest.raises(InvalidEvent):
        m.hard_cut("late")
    assert m.request_stop() == "stopping"


def test_ids_start_after_the_ping() -> None:
    """The PP channel's startup PING takes PING_CALL_ID; the machine's ids start right after it."""
    m = machine()
    assert m.next_call_id() == FIRST_CALL_ID == PING_CALL_ID + 1
    assert m.plan_next(0.0).call_id == FIRST_CALL_ID + 1


# -- the table ----------------------------------------------------------------------------------


def test_every_state_event_pair_follows_the_table() -> None:
    """h2-style: firing (state, event) either moves where the table says or raises and changes nothing."""
    for state in CHUNK_STATES:
        for event in ChunkMachine.events():
            m = machine()
            m._machine.set_state(state)  # test-only: jump to the state
            dest = ChunkMachine.next_state(state, event)
            if dest is None:
                with pytest.raises(InvalidEvent):
                    m.fire(event)
                assert m.state == state
            else:
                assert m.fire(event) == dest


def test_the_deadline_p99_covers_the_last_200_round_trips() -> None:
    """pp1.md §5: the rolling p99 of the last 200 INFER round trips (nearest rank: with 200 samples, the third
    largest). Three slow round trips among 197 fast ones set the deadline; one more fast one pushes the first
    slow one out of the window."""
    m = machine(deadline_floor_s=1.0, deadline_factor=4.0)  # the default window
    for i in range(3):
        run_chunk(m, now=float(i), rtt=10.0)
    for i in range(197):
        run_chunk(m, now=100.0 + i, rtt=0.1)
    assert m.deadline_s() == pytest.approx(40.0)
    run_chunk(m, now=400.0, rtt=0.1)
    assert m.deadline_s() == pytest.approx(1.0)  # 4 x 0.1 < floor


def test_a_heartbeat_is_due_exactly_h_after_the_last_activity() -> None:
    m = machine(heartbeat_s=1.0)
    run_chunk(m, now=0.0, rtt=0.5)
    assert not m.noop_due(1.49) and m.noop_due(1.5)


def test_a_stale_result_while_draining_is_discarded_not_accepted() -> None:
    m = machine()
    plan = send(m, 0.0)
    m.hard_cut("new prompt")
    m.request_stop()
    assert m.state == "draining"
    d = m.on_result(answer(plan), 1.0)
    assert d.verdict is Verdict.DISCARD_STALE and m.stats.emitted == 0 and m.stats.discarded_stale == 1
    assert m.state == "closing" and m.position == 0
