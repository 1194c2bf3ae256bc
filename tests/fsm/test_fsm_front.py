"""The front's loop (``fsm/front.py``: FrontMachine), state by state: what each event returns. (Every (state,
event) pair of its table is covered generically by test_fsm_tables.py; these pin the loop's rules.)"""

from __future__ import annotations

from typing import Any

import pytest
from fsm_roles_helpers import GEOMETRY, TIMESTEPS

from pp1.fsm.base import Intent
from pp1.fsm.chunk import ChunkMachine
from pp1.fsm.events import (
    CutRequested,
    Decoded,
    DrainRequested,
    LocalError,
    PairWarm,
    PeerGone,
    ReadyReceived,
    ResultReceived,
    Sent,
    StopRequested,
    TimedOut,
    Woke,
)
from pp1.fsm.front import FAREWELL_BOUND_S, FrontMachine, Pace
from pp1.fsm.intents import (
    EXIT_FAILED,
    EXIT_OK,
    AwaitReady,
    AwaitResult,
    Decode,
    Exit,
    Idle,
    KeepLatents,
    NextStep,
    SendEnvelope,
    Show,
    WarmPair,
)
from pp1.fsm.lifecycle import FrontLifecycleMachine
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, ReadyV1
from pp1.protocol.schedule import PING_CALL_ID

H, FLOOR, FACTOR, WARM, READY_S = 1.0, 10.0, 4.0, 20.0, 600.0
READY = ReadyV1(mesh_size=2, warmup_chunks=0, warmup_ms=(), fingerprint="fp")


def front(*, ping: bool = True, overlap: bool = True, geometry: ChunkGeometry = GEOMETRY, lifecycle: bool = False,
          **kw: Any) -> FrontMachine:
    chunk_kw = {k: kw.pop(k) for k in ("recompute_every", "context_source") if k in kw}
    chunk = ChunkMachine(0, chunk_frames=geometry.latent_frames, window=geometry.max_context_frames,
                         timesteps=TIMESTEPS, heartbeat_s=H, deadline_floor_s=FLOOR, deadline_factor=FACTOR,
                         **{"recompute_every": 0, **chunk_kw})
    lc = None
    if lifecycle:
        lc = FrontLifecycleMachine(0)
        for event in ("start", "parity_ok", "loaded", "vote_ok", "barrier_done"):
            lc.fire(event)
    return FrontMachine(0, chunk=chunk, geometry=geometry, overlap=overlap, ping=ping, warm_timeout_s=WARM,
                        ready_timeout_s=READY_S, lifecycle=lc, **kw)


def answer(env: PPEnvelopeV1, ok: bool = True, **over: Any) -> PPResultV1:
    fields: dict[str, Any] = dict(action=env.action, ok=ok, call_id=env.call_id, chunk_index=env.chunk_index,
                                  cache_epoch=env.cache_epoch)
    if env.action is Action.INFER and ok:
        fields["observed_generator_calls"] = env.expected_generator_calls
    if not ok:
        fields.update(error_code="generator_failed", error_message="boom")
    fields.update(over)
    return PPResultV1(**fields)


def only(intents: list[Intent], kind: type) -> Any:
    assert len(intents) == 1 and isinstance(intents[0], kind), intents
    return intents[0]


def kinds(intents: list[Intent]) -> list[str]:
    return [type(i).__name__ for i in intents]


def serving(now: float = 0.0, **kw: Any) -> tuple[FrontMachine, SendEnvelope]:
    """A PP1 front through PING, pair warm-up and READY; returns it and its first chunk's SendEnvelope."""
    f = front(**kw)
    ping = only(f.start(now), SendEnvelope)
    f.handle(Sent(now))
    only(f.handle(ResultReceived(answer(ping.envelope), now)), WarmPair)
    only(f.handle(PairWarm(now)), AwaitReady)
    return f, only(f.handle(ReadyReceived(READY, now)), SendEnvelope)


def round_trip(f: FrontMachine, send: SendEnvelope, sent_at: float, back_at: float) -> list[Intent]:
    """Send ``send`` at ``sent_at`` (its AwaitResult follows, or a Decode first), answer it at ``back_at``."""
    out = f.handle(Sent(sent_at))
    while not isinstance(out[0], AwaitResult):
        if isinstance(out[0], Decode):
            out = f.handle(Decoded(out[0].call_id, sent_at))
            out = [i for i in out if not isinstance(i, Show)]
        if isinstance(out[0], NextStep):
            out = f.handle(Woke(sent_at))
    return f.handle(ResultReceived(answer(send.envelope), back_at))


# -- startup: PING, the pair's warm-up, READY ------------------------------------------------------------


def test_startup_ping_warm_pair_ready_then_the_first_chunk() -> None:
    f = front(lifecycle=True)
    ping = only(f.start(1.0), SendEnvelope)
    assert ping.envelope.action is Action.PING and ping.envelope.call_id == PING_CALL_ID and ping.timeout_s == WARM
    assert only(f.handle(Sent(2.0)), AwaitResult).until == 2.0 + WARM
    only(f.handle(ResultReceived(answer(ping.envelope), 3.0)), WarmPair)
    assert only(f.handle(PairWarm(4.0)), AwaitReady).until == 4.0 + READY_S
    assert f.lifecycle is not None and f.lifecycle.state == "warmup"
    first = only(f.handle(ReadyReceived(READY, 5.0)), SendEnvelope)
    env = first.envelope
    assert (env.action, env.call_id, env.chunk_index, env.init_cache) == (Action.INFER, PING_CALL_ID + 1, 0, True)
    assert f.state == "serving" and f.lifecycle.state == "serving" and f.ready == READY


def test_pure_tp_serves_at_once() -> None:
    f = front(ping=False)
    env = only(f.start(0.0), SendEnvelope).envelope
    assert f.state == "serving" and env.action is Action.INFER and env.call_id == PING_CALL_ID + 1


@pytest.mark.parametrize("bad", [dict(ok=False), dict(call_id=5)])
def test_a_bad_ping_answer_fails_without_farewell(bad: dict[str, Any]) -> None:
    f = front()
    ping = only(f.start(0.0), SendEnvelope)
    f.handle(Sent(0.0))
    ex = only(f.handle(ResultReceived(answer(ping.envelope, **bad), 1.0)), Exit)
    assert ex.code == EXIT_FAILED and f.state == "failed"


@pytest.mark.parametrize("stage", ["pinging", "warming", "awaiting_ready"])
def test_a_startup_wait_that_runs_out_fails_poisoned(stage: str) -> None:
    """No farewell SHUTDOWN: the channel's wait ran out (gloo closed the pair)."""
    f = front(lifecycle=True)
    ping = only(f.start(0.0), SendEnvelope)
    f.handle(Sent(0.0))
    if stage != "pinging":
        f.handle(ResultReceived(answer(ping.envelope), 0.0))
    if stage == "awaiting_ready":
        f.handle(PairWarm(0.0))
    assert f.state == stage
    ex = only(f.handle(TimedOut(100.0)), Exit)
    assert ex.code == EXIT_FAILED and f.state == "failed" and f.chunk.state != "failed"
    assert f.lifecycle is not None and f.lifecycle.state == "failed"


def test_a_lost_leader_before_serving_fails_without_farewell() -> None:
    f = front()
    f.start(0.0)
    f.handle(Sent(0.0))
    assert kinds(f.handle(PeerGone("connection closed"))) == ["Exit"]


# -- the loop: overlap and serial order, heartbeats, the deadline --------------------------------------------


def test_overlap_sends_the_next_chunk_before_decoding_the_last() -> None:
    f, first = serving(overlap=True)
    assert only(f.handle(Sent(1.0)), AwaitResult).until == 1.0 + FLOOR
    out = f.handle(ResultReceived(answer(first.envelope), 2.0))
    assert kinds(out) == ["KeepLatents", "NextStep"]
    nxt = only(f.handle(Woke(2.0)), SendEnvelope)
    assert nxt.envelope.chunk_index == 1
    dec = only(f.handle(Sent(2.0)), Decode)
    assert (dec.call_id, dec.chunk_index, dec.first_frame) == (first.envelope.call_id, 0, 0)
    out = f.handle(Decoded(dec.call_id, 2.5))
    assert kinds(out) == ["Show", "NextStep"] and f.shown == 1
    assert only(f.handle(Woke(2.5)), AwaitResult).until == 2.0 + FLOOR


def test_serial_link_shows_each_chunk_before_sending_the_next() -> None:
    f, first = serving(overlap=False)
    f.handle(Sent(1.0))
    assert kinds(f.handle(ResultReceived(answer(first.envelope), 2.0))) == ["KeepLatents", "NextStep"]
    dec = only(f.handle(Woke(2.0)), Decode)
    assert kinds(f.handle(Decoded(dec.call_id, 2.1))) == ["Show", "NextStep"]
    assert only(f.handle(Woke(2.1)), SendEnvelope).envelope.chunk_index == 1


def test_heartbeat_after_h_seconds_idle() -> None:
    f = front(ping=False, max_chunks=1, after_chunks="idle")
    first = only(f.start(0.0), SendEnvelope)
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 0.5))
    dec = only(f.handle(Woke(0.5)), Decode)
    f.handle(Decoded(dec.call_id, 0.5))
    assert f.done
    assert only(f.handle(Woke(0.5)), Idle).until == 0.5 + H
    noop = only(f.handle(Woke(0.5 + H)), SendEnvelope)
    assert noop.envelope.action is Action.NOOP


def test_headless_then_shutdown_drains_after_max_chunks() -> None:
    f = front(ping=False, max_chunks=1, after_chunks="shutdown", lifecycle=True)
    first = only(f.start(0.0), SendEnvelope)
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 0.5))
    shutdown = only(f.handle(Woke(0.5)), SendEnvelope)  # overlap: SHUTDOWN goes out, then the decode
    assert shutdown.envelope.action is Action.SHUTDOWN
    dec = only(f.handle(Sent(0.5)), Decode)
    f.handle(Decoded(dec.call_id, 0.6))
    only(f.handle(Woke(0.6)), AwaitResult)
    ex = only(f.handle(ResultReceived(answer(shutdown.envelope), 0.7)), Exit)
    assert ex.code == EXIT_OK and f.state == "ended"


def test_next_step_and_woke_drive_the_loop() -> None:
    """Every step after a result goes through NextStep (requests from other threads apply there)."""
    f, first = serving()
    f.handle(Sent(0.0))
    out = f.handle(ResultReceived(answer(first.envelope), 1.0))
    assert isinstance(out[-1], NextStep) and NextStep.BETWEEN_STEPS


def test_the_deadline_is_the_p99_rule() -> None:
    f, send = serving(overlap=False)
    t = 0.0
    for _ in range(3):  # round trips of 5 s: the deadline is max(4 x 5, floor) = 20
        out = round_trip(f, send, t, t + 5.0)
        t += 5.0
        while not isinstance(out[0], SendEnvelope):
            out = f.handle(Decoded(out[0].call_id, t)) if isinstance(out[0], Decode) else f.handle(Woke(t))
            out = [i for i in out if not isinstance(i, Show)]
        send = out[0]
    assert only(f.handle(Sent(t)), AwaitResult).until == t + FACTOR * 5.0


# -- history and context ------------------------------------------------------------------------------------


def test_history_is_trimmed_to_what_a_later_window_can_reach() -> None:
    f, send = serving(overlap=False)
    t = 0.0
    for k in range(4):
        out = f.handle(Sent(t))
        out = f.handle(ResultReceived(answer(send.envelope), t))
        keep = out[0]
        assert isinstance(keep, KeepLatents)
        assert keep.first_frame == 3 * k and keep.keep_from == 3 * (k + 1) - 6
        dec = only(f.handle(Woke(t)), Decode)
        f.handle(Decoded(dec.call_id, t))
        send = only(f.handle(Woke(t)), SendEnvelope)


def test_reencode_decodes_first_when_the_window_starts_in_the_undecoded_chunk() -> None:
    """A window shorter than a chunk (2 < 3): the re-encoded frame (latent 1) lies in chunk 0, not decoded yet
    under overlap: chunk 0 is decoded before chunk 1 (a recompute) goes out."""
    small = GEOMETRY.model_copy(update={"max_context_frames": 2})
    f, first = serving(geometry=small, recompute_every=1, context_source="reencode")
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 1.0))
    dec = only(f.handle(Woke(1.0)), Decode)
    assert dec.chunk_index == 0
    assert kinds(f.handle(Decoded(dec.call_id, 1.1))) == ["Show", "NextStep"]
    send = only(f.handle(Woke(1.1)), SendEnvelope)
    assert send.envelope.do_kv_recompute and (send.context_start, send.context_frames, send.reencode) == (1, 2, 1)


def test_reencode_keeps_overlap_when_the_window_starts_in_decoded_chunks() -> None:
    f, first = serving(recompute_every=1, context_source="reencode")
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 1.0))
    send = only(f.handle(Woke(1.0)), SendEnvelope)
    assert send.envelope.do_kv_recompute and send.reencode is None  # s = 0: the epoch's own first frame is kept


# -- hard cuts and stale chunks ------------------------------------------------------------------------------


def test_a_cut_while_in_flight_drops_the_result() -> None:
    f, first = serving()
    f.handle(Sent(0.0))
    assert f.handle(CutRequested("new prompt", 0.5)) == []
    out = f.handle(ResultReceived(answer(first.envelope), 1.0))
    assert kinds(out) == ["Drop", "NextStep"] and "stale" in out[0].why
    nxt = only(f.handle(Woke(1.0)), SendEnvelope).envelope
    assert (nxt.cache_epoch, nxt.chunk_index, nxt.reset_cache) == (1, 0, True)


def test_a_cut_before_the_decode_drops_the_received_chunk() -> None:
    f, first = serving()
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 1.0))
    f.handle(CutRequested("new prompt", 1.0))
    out = f.handle(Woke(1.0))
    assert kinds(out) == ["Drop", "SendEnvelope"] and "before it was decoded" in out[0].why
    assert out[1].envelope.cache_epoch == 1 and f.shown == 0


def test_a_cut_during_the_decode_drops_the_decoded_chunk() -> None:
    f, first = serving(overlap=False)
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 1.0))
    dec = only(f.handle(Woke(1.0)), Decode)
    f.handle(CutRequested("new prompt", 1.0))
    out = f.handle(Decoded(dec.call_id, 1.2))
    assert kinds(out) == ["Drop", "NextStep"] and f.shown == 0


def test_a_cut_outside_serving_is_ignored() -> None:
    f = front()
    f.start(0.0)
    assert f.handle(CutRequested("early", 0.0)) == [] and f.chunk.cache_epoch == 0


# -- stop, drain -----------------------------------------------------------------------------------------------


def test_a_stop_before_serving_is_kept_and_applied_at_ready() -> None:
    f = front(lifecycle=True)
    ping = only(f.start(0.0), SendEnvelope)
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(ping.envelope), 0.0))
    assert f.handle(StopRequested(0.0)) == []
    f.handle(PairWarm(0.0))
    shutdown = only(f.handle(ReadyReceived(READY, 1.0)), SendEnvelope)
    assert shutdown.envelope.action is Action.SHUTDOWN
    assert f.lifecycle is not None and f.lifecycle.state == "draining"
    f.handle(Sent(1.0))
    assert only(f.handle(ResultReceived(answer(shutdown.envelope), 1.5)), Exit).code == EXIT_OK
    assert f.lifecycle.state == "shutdown"


def test_a_drain_in_serving_moves_the_lifecycle_and_shuts_down_after_the_chunk() -> None:
    f, first = serving(lifecycle=True)
    f.handle(Sent(0.0))
    assert f.handle(DrainRequested(0.5)) == []
    assert f.lifecycle is not None and f.lifecycle.state == "draining" and f.chunk.state == "draining"
    out = f.handle(ResultReceived(answer(first.envelope), 1.0))
    assert kinds(out) == ["KeepLatents", "NextStep"]
    assert only(f.handle(Woke(1.0)), SendEnvelope).envelope.action is Action.SHUTDOWN


# -- failure and the farewell ----------------------------------------------------------------------------------


def test_second_failure_in_a_row_fails_with_a_farewell() -> None:
    f, send = serving()
    f.handle(Sent(0.0))
    assert kinds(f.handle(ResultReceived(answer(send.envelope, ok=False), 1.0))) == ["NextStep"]  # retry
    retry = only(f.handle(Woke(1.0)), SendEnvelope)
    f.handle(Sent(1.0))
    out = f.handle(ResultReceived(answer(retry.envelope, ok=False), 2.0))
    assert kinds(out) == ["SendEnvelope", "Exit"]
    farewell, ex = out
    assert farewell.envelope.action is Action.SHUTDOWN and farewell.envelope.call_id > retry.envelope.call_id
    assert farewell.timeout_s == min(FAREWELL_BOUND_S, 4 * H) and ex.code == EXIT_FAILED
    assert f.handle(Sent(2.1)) == []  # the farewell's send: nothing more


def test_a_missed_deadline_fails_poisoned_without_farewell() -> None:
    f, first = serving()
    f.handle(Sent(0.0))
    out = f.handle(TimedOut(FLOOR + 1))
    assert kinds(out) == ["Exit"] and f.chunk.poisoned


def test_a_failure_drops_the_chunk_received_not_decoded() -> None:
    """Chunk 0 received (its decode still owed), chunk 1's send breaks: chunk 0 is dropped, never shown."""
    f, first = serving()
    f.handle(Sent(0.0))
    f.handle(ResultReceived(answer(first.envelope), 1.0))
    only(f.handle(Woke(1.0)), SendEnvelope)
    out = f.handle(PeerGone("connection closed by peer"))
    assert kinds(out) == ["Drop", "Exit"] and out[0].call_id == first.envelope.call_id and f.chunk.poisoned


def test_a_send_that_runs_out_fails_poisoned() -> None:
    """The leader did not take the envelope within its bound: nothing is awaited, the channel is closed."""
    f, _ = serving()
    out = f.handle(TimedOut(FLOOR + 1))
    assert kinds(out) == ["Exit"] and f.chunk.poisoned and f.state == "failed"
    assert f.handle(TimedOut(FLOOR + 2)) == []  # terminal: a later wait (the farewell's) is nothing


def test_a_refused_envelope_is_planned_again_with_a_new_id() -> None:
    f, first = serving()
    assert kinds(f.handle(LocalError("not serialisable"))) == ["NextStep"]
    again = only(f.handle(Woke(0.0)), SendEnvelope)
    assert again.envelope.chunk_index == 0 and again.envelope.call_id == first.envelope.call_id + 1


def test_decoded_for_another_call_fails_locally() -> None:
    f, first = serving()
    f.handle(Sent(0.0))
    assert isinstance(f.handle(Decoded(first.envelope.call_id, 1.0))[-1], Exit)
    assert f.failure is not None and f.failure.kind == "local"



# -- pacing: a served stream is planned at its frame rate --------------------------------------------------


def _drive(f: FrontMachine, first: SendEnvelope, *, until: float, mesh_s: float | Any = 0.0,
           events: dict[float, Any] | None = None) -> list[tuple[float, PPEnvelopeV1]]:
    """Run the loop on a virtual clock with a mesh answering each envelope after ``mesh_s`` (seconds, or a
    function of the send time): every
    ``Idle(until)`` advances the clock; ``events`` (time -> event) are fed at the first step at or after their
    time. Returns (send time, envelope) of each INFER sent before ``until``."""
    now, sent, pending = 0.0, [], sorted((events or {}).items())
    out: list[Intent] = [first]
    in_flight: tuple[float, PPEnvelopeV1] | None = None
    while now < until:
        while pending and pending[0][0] <= now:
            out = f.handle(pending.pop(0)[1]) + out
        it = out.pop(0) if out else None
        if isinstance(it, SendEnvelope):
            if it.envelope.action is Action.INFER:
                sent.append((now, it.envelope))
            in_flight = (now, it.envelope)
            out = f.handle(Sent(now)) + out
        elif isinstance(it, AwaitResult):
            assert in_flight is not None
            now = max(now, in_flight[0] + (mesh_s(in_flight[0]) if callable(mesh_s) else mesh_s))
            assert it.until >= now
            env, in_flight = in_flight[1], None
            out = f.handle(ResultReceived(answer(env), now)) + out
        elif isinstance(it, Decode):
            out = f.handle(Decoded(it.call_id, now)) + out
        elif isinstance(it, NextStep) or it is None:
            out = f.handle(Woke(now)) + out
        elif isinstance(it, Idle):
            assert it.until > now, (it, now)
            now = min(it.until, pending[0][0]) if pending and pending[0][0] > now else it.until
            out = [NextStep(), *out]  # woken after the events due by then
        elif isinstance(it, KeepLatents | Show):
            continue
        else:
            raise AssertionError(f"unexpected {it!r}")
    return sent


def test_a_paced_stream_plans_its_chunks_at_the_frame_rate() -> None:
    """A mesh that answers at once: chunks go out one chunk's video time apart (after the first chunk and the
    lead), so the video planned never runs more than the lead (+ the chunk being planned) ahead of the clock;
    unpaced, the same loop sends as fast as it is answered."""
    pace = Pace(chunk_s=0.75, lead_s=0.375)
    f, first = serving(pace=pace)
    sent = _drive(f, first, until=30.0)
    times = [t for t, _ in sent]
    assert 39 <= len(times) <= 42  # 30 s of video at 0.75 s a chunk, + the lead
    gaps = [b - a for a, b in zip(times[2:], times[3:], strict=False)]
    assert all(g == pytest.approx(0.75) for g in gaps), gaps
    for n, t in enumerate(times):
        assert (n + 1) * pace.chunk_s <= t + pace.lead_s + pace.chunk_s + 1e-9  # never further ahead
    unpaced, first = serving()
    assert len(_drive(unpaced, first, until=0.5, mesh_s=0.01)) >= 40


def test_a_mesh_slower_than_the_frame_rate_is_never_held() -> None:
    """Slower than the frame rate: every chunk goes out as soon as the last one is back (nothing held)."""
    pace = Pace(chunk_s=0.5, lead_s=0.25)
    f, first = serving(pace=pace)
    sent = [t for t, _ in _drive(f, first, until=10.0, mesh_s=1.0)]
    assert [b - a for a, b in zip(sent, sent[1:], strict=False)] == pytest.approx([1.0] * (len(sent) - 1))


def test_a_mesh_that_was_slow_does_not_burst_when_it_gets_fast() -> None:
    """Slow for 5 s (1 s a chunk of 0.5 s of video), then instant: the time lost is not made up by a burst;
    from then on the chunks go out at the frame rate, at most the lead ahead of the clock."""
    pace = Pace(chunk_s=0.5, lead_s=0.25)
    f, first = serving(pace=pace)
    sent = [t for t, _ in _drive(f, first, until=10.0, mesh_s=lambda t: 1.0 if t < 5.0 else 0.0)]
    fast = [t for t in sent if t >= 5.0]
    assert len(fast) <= (10.0 - 5.0) / pace.chunk_s + 2, fast
    assert all(b - a >= pace.chunk_s - 1e-9 for a, b in zip(fast[1:], fast[2:], strict=False)), fast


def test_pausing_or_restarting_the_stream_restarts_the_pacing_count() -> None:
    from pp1.fsm.events import PauseRequested

    pace = Pace(chunk_s=1.0, lead_s=0.5)
    f, first = serving(pace=pace)
    sent = _drive(f, first, until=3.2, events={1.0: PauseRequested(True, 1.0), 2.0: PauseRequested(False, 2.0)})
    times = [t for t, _ in sent]
    assert times[0] == 0.0 and 2.0 in times  # resumed at once, not held by the count from before the pause
    assert all(t < 1.0 or t >= 2.0 for t in times)
