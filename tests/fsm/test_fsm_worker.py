"""The worker loop and its watchdog (fsm/worker.py), alone and driven by a LeaderRelayMachine."""

from __future__ import annotations

from typing import Any

import pytest
from fsm_roles_helpers import GEOMETRY, TIMESTEPS, control, infer

from pp1.fsm.base import InvalidEvent
from pp1.fsm.intents import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ORPHAN,
    AwaitHeader,
    Exit,
    MakeWarmupTensors,
    RecvTensors,
    RunShard,
    SendResult,
    SendTP,
    WarmMesh,
)
from pp1.fsm.leader import LeaderRelayMachine, expected_calls, warmup_plan
from pp1.fsm.worker import WorkerLoopMachine
from pp1.protocol.messages import Action, TPHeaderV1, relay_header


def worker(warm: bool = True, **kw: Any) -> WorkerLoopMachine:
    """A worker; ``warm``: past the leader's PING and the mesh probe (waiting for warmup headers, at t=0)."""
    args: dict[str, Any] = dict(watchdog_s=5.0, now=0.0, heartbeat_s=1.0, geometry=GEOMETRY)
    args.update(kw)
    w = WorkerLoopMachine(2, **args)
    if warm:
        assert w.start(0.0) == [AwaitHeader(until=20.0)]  # the PING's bound: 4 W
        assert w.on_header(tp(Action.PING, 0), now=0.0) == [WarmMesh()]
        assert w.on_mesh_warm(now=0.0) == [AwaitHeader(until=5.0)]
        assert w.state == "waiting"
    return w


def tp(action: Action, call_id: int) -> TPHeaderV1:
    return TPHeaderV1(action=action, call_id=call_id)


def test_normal_run_warmup_infer_noop_shutdown() -> None:
    w = worker()
    for h in warmup_plan(2, GEOMETRY, TIMESTEPS):
        # WARMUP tensors are made from the seed, never received
        assert w.on_header(h, now=0.5) == [MakeWarmupTensors(h), RunShard(h)]
        assert w.state == "running" and not w.serving
        assert w.on_shard_done(now=1.0) == [AwaitHeader(until=6.0)]
        assert w.state == "waiting"
    h = relay_header(infer(0))  # the serving sequence restarts at the front's call_ids
    assert w.on_header(h, now=2.0) == [RecvTensors(h.tensors), RunShard(h)]
    assert w.serving
    w.on_shard_done(now=3.0)
    assert w.on_header(tp(Action.NOOP, 1), now=3.5) == [AwaitHeader(until=8.5)] and w.state == "waiting"
    assert w.on_header(tp(Action.SHUTDOWN, 2), now=4.0) == [Exit(EXIT_OK, "shutdown (call_id=2)")]
    assert w.state == "exited" and w.is_terminal and w.failure is None
    assert w.headers_seen == 5


def test_the_leaders_ping_comes_first() -> None:
    w = worker(warm=False)
    assert w.state == "warming"
    (ex,) = w.on_header(tp(Action.NOOP, 0), now=1.0)
    assert ex.code == EXIT_FAILED and "expected the leader's PING" in ex.reason and w.state == "failed"
    w2 = worker(warm=False)
    w2.start(0.0)
    (ex2,) = w2.on_timed_out(20.0)
    assert ex2.code == EXIT_FAILED and "no PING" in ex2.reason


def test_a_lost_leader_is_an_orphan_exit() -> None:
    w = worker()
    (ex,) = w.on_peer_gone("Connection closed by peer")
    assert ex.code == EXIT_ORPHAN and w.failure is not None and w.failure.kind == "remote"


def test_a_timed_out_wait_before_the_watchdog_waits_again() -> None:
    w = worker()
    assert w.on_timed_out(4.0) == [AwaitHeader(until=5.0)] and w.state == "waiting"
    (ex,) = w.on_timed_out(5.0)
    assert ex.code == EXIT_ORPHAN


def test_noop_rearms_the_watchdog() -> None:
    w = worker()
    assert w.watchdog_deadline() == 5.0
    assert w.on_tick(4.9) == []
    w.on_header(tp(Action.NOOP, 1), now=4.0)
    assert w.watchdog_deadline() == 9.0
    assert w.on_tick(8.9) == [] and w.state == "waiting"


def test_watchdog_expiry_is_an_orphan_exit() -> None:
    w = worker()
    w.on_header(tp(Action.NOOP, 1), now=1.0)
    (ex,) = w.on_tick(6.0)
    assert ex == Exit(EXIT_ORPHAN, "orphan: no header for 5.0 s (watchdog W=5 s)")
    assert w.state == "failed" and w.failure is not None
    assert (w.failure.phase, w.failure.kind) == ("waiting", "remote") and w.failure.reason.startswith("orphan")
    assert w.on_tick(100.0) == []  # already failed: nothing more


def test_watchdog_not_armed_while_a_shard_runs() -> None:
    w = worker()
    w.on_header(relay_header(infer(0)), now=1.0)
    assert w.watchdog_deadline() == float("inf")
    assert w.on_tick(1000.0) == [] and w.state == "running"
    w.on_shard_done(now=1000.0)
    assert w.watchdog_deadline() == 1005.0


def test_header_while_running_is_invalid_event() -> None:
    w = worker()
    w.on_header(relay_header(infer(0)), now=1.0)
    for h in (tp(Action.NOOP, 1), tp(Action.SHUTDOWN, 1), relay_header(infer(1)), tp(Action.PING, 1)):
        with pytest.raises(InvalidEvent):
            w.on_header(h, now=2.0)
        assert w.state == "running"


def test_shard_done_while_waiting_is_invalid_event() -> None:
    w = worker()
    with pytest.raises(InvalidEvent):
        w.on_shard_done(now=1.0)
    assert w.state == "waiting"


@pytest.mark.parametrize("action", [Action.PING, Action.READY])
def test_unexpected_action_fails_the_worker(action: Action) -> None:
    w = worker()
    (ex,) = w.on_header(tp(action, 0), now=1.0)
    assert ex.code == EXIT_FAILED and "unexpected TP action" in ex.reason
    assert w.state == "failed" and w.failure is not None and w.failure.kind == "remote"


def test_invalid_header_fails_the_worker() -> None:
    w = worker()
    w.on_header(tp(Action.NOOP, 3), now=1.0)
    (ex,) = w.on_header(tp(Action.NOOP, 3), now=2.0)
    assert ex.code == EXIT_FAILED and "call_id_not_increasing" in ex.reason
    assert w.state == "failed"


def test_shard_failure_exits_non_zero() -> None:
    w = worker()
    w.on_header(relay_header(infer(7, chunk_index=0)), now=1.0)
    assert w.state == "running"
    (ex,) = w.on_shard_failed("RuntimeError: boom")
    assert ex.code == EXIT_FAILED and "call_id=7" in ex.reason
    assert w.state == "failed" and w.failure is not None and w.failure.phase == "running"


def test_watchdog_must_exceed_three_heartbeats() -> None:
    with pytest.raises(ValueError, match="3 x heartbeat"):
        WorkerLoopMachine(2, watchdog_s=3.0, now=0.0, geometry=GEOMETRY, heartbeat_s=1.0)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            WorkerLoopMachine(2, watchdog_s=bad, now=0.0, geometry=GEOMETRY)


def test_leader_and_workers_together() -> None:
    """A leader's intents delivered to two workers: warmup, a NOOP, two chunks, SHUTDOWN."""
    leader = LeaderRelayMachine(1, GEOMETRY, 3, timesteps=TIMESTEPS, warmup_chunks=2)
    workers = [worker(), worker()]
    exits: list[Exit] = []
    results = []
    clock = [0.0]

    def perform(intents: list[Any]) -> None:
        pending = list(intents)
        while pending:
            it = pending.pop(0)
            clock[0] += 0.1
            if isinstance(it, SendTP):
                for w in workers:
                    for wi in w.on_header(it.header, clock[0]):
                        if isinstance(wi, Exit):
                            exits.append(wi)
                        elif isinstance(wi, RunShard):
                            w.on_shard_done(clock[0])
            elif isinstance(it, RunShard):
                pending[:0] = leader.on_shard_done(expected_calls(it.header), 3, {"total": 1.0})
            elif isinstance(it, SendResult):
                results.append(it.result)
                pending[:0] = leader.on_result_sent(clock[0])
            elif isinstance(it, Exit):
                exits.append(it)

    perform(leader.start_warmup())
    assert leader.state == "idle" and all(not w.serving for w in workers)
    perform(leader.on_envelope(control(Action.NOOP, 0)))
    assert all(w.serving for w in workers)
    perform(leader.on_envelope(infer(1)))
    perform(leader.on_envelope(infer(2, chunk_index=1, recompute=True)))
    perform(leader.on_envelope(control(Action.SHUTDOWN, 3)))
    assert [r.ok for r in results] == [True, True, True, True]
    assert [r.call_id for r in results] == [0, 1, 2, 3]
    assert [e.code for e in exits] == [EXIT_OK] * 3
    assert leader.state == "exited" and all(w.state == "exited" for w in workers)


def test_warmup_done_at_the_first_header_that_is_not_warmup() -> None:
    """A heartbeat may come before the first chunk: the worker serves from it (its lifecycle too)."""
    from pp1.fsm.lifecycle import make_lifecycle

    lc = make_lifecycle("worker", 2)
    for e in ["start", "parity_ok", "loaded", "vote_ok", "fingerprint_ok", "barrier_done", "channels_warm"]:
        lc.fire(e)
    w = worker(lifecycle=lc)
    w.on_header(tp(Action.NOOP, 1), now=1.0)
    assert w.serving and lc.state == "serving"


def test_header_call_ids_must_increase() -> None:
    w = worker()
    w.on_header(tp(Action.NOOP, 3), now=1.0)
    (ex,) = w.on_header(tp(Action.NOOP, 3), now=2.0)
    assert ex.code == EXIT_FAILED and "call_id" in ex.reason


def test_a_tensor_receive_that_runs_out_is_fatal() -> None:
    """The header came, its tensors did not (within the bound): never run the shard on stale tensors."""
    w = worker()
    w.on_header(relay_header(infer(0)), now=1.0)
    (ex,) = w.on_timed_out(7.0)
    assert ex.code == EXIT_FAILED and w.state == "failed"
