"""Scripted runs of the whole job (model_cluster over ``pp1.testing.memory``: every rank's real machines and
executors): what the model test caught on the way, kept as explicit regressions, and the scenarios the
protocol must always get right.

Each test says what it pins down. ``c.pump(until=...)`` steps every rank round-robin (time jumps when none
can move); ``settle()`` drives the run to its end and checks the end state (every rank exited; no fault ->
all exit 0; no rank lost -> the workers exit 0; front exit 0 -> every envelope answered).
"""

from __future__ import annotations

import pytest
from model_cluster import FLOOR, Cluster, ModelViolation, W

from pp1.fsm.intents import SendEnvelope, SendResult

pytestmark = pytest.mark.timeout(120)


def serving(topology: str = "pp1", m: int = 2, **kw: object) -> Cluster:
    c = Cluster(topology, m, **kw)  # type: ignore[arg-type]
    c.run_until_serving()
    assert c.serving(), c.describe()
    return c


def exits(c: Cluster) -> list[int | None]:
    return [p.code for p in c.procs]


def in_flight(c: Cluster) -> bool:
    """The front sent an INFER and its result is not back yet."""
    s = c.ledger.last_sent
    return s is not None and s.action.value == "infer" and c.ledger.sent > c.ledger.received


@pytest.mark.parametrize("topology,m", [("pp1", 1), ("pp1", 2), ("pp1", 4), ("tp", 1), ("tp", 3)])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_clean_run_every_topology(topology: str, m: int, k: int) -> None:
    """Startup, 7 chunks shown (recompute on schedule), SIGTERM, every rank exits 0."""
    c = serving(topology, m, recompute_every=k, warmup_chunks=2)
    c.run_chunks(7)
    assert [i for _, i in c.ledger.shown] == list(range(7))
    assert c.ledger.recomputes == (0 if k == 0 else sum(1 for i in range(1, 7) if i % k == 0))
    c.settle()
    assert exits(c) == [0] * len(c.procs)


@pytest.mark.parametrize("topology,m", [("pp1", 1), ("pp1", 3), ("tp", 1), ("tp", 2)])
@pytest.mark.parametrize("k,warmup", [(1, 4), (2, 5), (3, 4)])
def test_warmup_past_the_window(topology: str, m: int, k: int, warmup: int) -> None:
    """Warmup chunks recompute over what the chunks before them generated, capped by the attention window
    (``--warmup-chunks 4`` would otherwise fail at startup: more context frames than the window)."""
    c = serving(topology, m, recompute_every=k, warmup_chunks=warmup)
    c.run_chunks(2)
    c.settle()
    assert exits(c) == [0] * len(c.procs)


def test_reencode_context_every_chunk() -> None:
    """Context frames re-encoded from decoded frames (Krea's recompute) run every chunk without a gap."""
    c = serving("pp1", 2, context_source="reencode", recompute_every=1)
    c.run_chunks(6)
    assert c.engine.reencoded >= 4
    c.settle()
    assert exits(c) == [0, 0, 0]


def test_hard_cut_with_chunk_in_flight_pp1() -> None:
    """The in-flight result is received and discarded; the new epoch's chunk 0 (reset_cache) passes the
    leader's epoch fence; nothing of the old epoch is shown after the cut."""
    c = serving("pp1", 2)
    c.run_chunks(2)
    c.pump(until=lambda: in_flight(c) and c.leader.leader.machine.state == "running")
    c.hard_cut()
    c.pump(until=lambda: c.ledger.received == c.ledger.sent)
    assert c.engine.machine.chunk.stats.discarded_stale == 1
    c.run_chunks(2)
    assert c.ledger.shown[-2:] == [(1, 0), (1, 1)]
    c.settle()
    assert exits(c) == [0, 0, 0]


def test_cut_while_result_is_queued() -> None:
    """A cut after the result was already sent (queued at the front): still discarded as stale."""
    c = serving("pp1", 1)
    c.pump(until=lambda: in_flight(c))
    pp = c.job.transport.pp
    assert pp is not None
    c.pump(ranks=[1], until=lambda: bool(pp.inbox[0]))
    c.hard_cut()
    c.pump(until=lambda: c.ledger.received == c.ledger.sent)
    assert c.ledger.shown == [] and c.engine.machine.chunk.stats.discarded_stale == 1
    c.run_chunks(1)
    assert c.ledger.shown == [(1, 0)]
    c.settle()


def test_prompt_change_binds_its_conditioning_to_the_new_epoch() -> None:
    """A prompt change is a hard cut; the new epoch's chunks carry the new prompt's conditioning."""
    c = serving("pp1", 2)
    c.run_chunks(2)
    c.prompt("a red fox")
    c.run_chunks(2)
    assert c.ledger.shown[-2:] == [(1, 0), (1, 1)]
    assert not c.ledger.conditioning[0].equal(c.ledger.conditioning[1])
    c.settle()


def test_invalid_envelope_is_answered_then_retried() -> None:
    """A corrupt (invalid) envelope is answered ok=False by the leader, never relayed; the front hard-cuts
    and retries once, and the retry succeeds."""
    c = serving("pp1", 2)
    c.corrupt("corrupt_envelope")
    c.pump(until=lambda: c.ledger.retries == 1)
    assert c.procs[2].generator is not None and all(cid != c.ledger.last_call_id for cid, *_ in
                                                     c.procs[2].generator.seen)
    c.run_chunks(1)
    assert c.ledger.shown == [(1, 0)]
    c.settle()
    assert exits(c) == [0, 0, 0]


@pytest.mark.parametrize("kind", ["unserialisable", "bad_dtype"])
def test_envelope_refused_before_sending_burns_its_call_id(kind: str) -> None:
    """An envelope the front's own checks refuse is never sent: its call_id is burned, the chunk planned
    again, nothing else changes."""
    c = serving("pp1", 2)
    c.corrupt(kind)
    c.run_chunks(2)
    assert c.ledger.shown == [(0, 0), (0, 1)] and c.ledger.retries == 0
    c.settle()
    assert exits(c) == [0, 0, 0]


def test_two_failures_in_a_row_fail_the_mesh_with_farewell() -> None:
    """Retry once; the second failure in a row fails the front, which sends a best-effort SHUTDOWN (channel
    clean) so the workers exit 0 instead of waiting for their watchdog (the leader relays it, then finds the
    front gone when it answers: exit 1)."""
    c = serving("pp1", 3)
    c.generator_fault(1, "tripwire")
    c.pump(until=lambda: c.ledger.retries == 1)
    c.generator_fault(1, "tripwire")
    c.pump(until=lambda: not c.front.alive)
    assert c.front.code == 1 and c.ledger.farewell
    c.settle()
    assert exits(c) == [1, 1, 0, 0]


def test_altered_ids_trip_the_front() -> None:
    """An envelope whose ids were altered in transit looks valid to the leader (it cannot know the schedule),
    is relayed and computed; only the front's tripwire (result chunk_index != sent) stops it, and it must
    fail loudly rather than show a wrong chunk."""
    c = serving("pp1", 2)
    c.tamper_next_envelope(chunk_index=1, init_cache=False, reset_cache=False)
    c.pump(until=lambda: not c.front.alive)
    assert c.front.code == 1 and c.ledger.shown == []
    failure = c.front.lifecycle.failure
    assert failure is not None and "id_mismatch" in failure.reason
    c.settle()


def test_garbage_frame_kills_leader_front_fails_fast() -> None:
    """An undecodable frame poisons the leader's channel (exit 1); the front's receive fails on the closed
    channel (no waiting for the deadline); the workers follow."""
    c = serving("pp1", 2)
    t0 = c.job.now
    c.garble(1)
    c.pump(until=lambda: not c.front.alive)
    assert c.job.now == t0 and exits(c)[:2] == [1, 1]
    c.settle()


def test_result_after_deadline_fails_poisoned() -> None:
    """No result by the deadline (the leader stalled): the front fails, its channel poisoned (no farewell
    SHUTDOWN); the late result is never read; every other rank ends."""
    c = serving("pp1", 2)
    c.pump(until=lambda: in_flight(c))
    c.stall(1, FLOOR + 10)
    c.pump(until=lambda: not c.front.alive)
    assert c.engine.machine.chunk.poisoned and not c.ledger.farewell
    c.settle()
    assert all(code != 0 for code in exits(c)[:2])


def test_send_that_runs_out_fails_the_front_poisoned() -> None:
    """Found by the model: the leader stalls (not receiving) when the front sends; the send runs out of its
    bound (gloo: WaitExpired, the pair closed). The front used to raise (no deadline in state building);
    now it fails poisoned, without a farewell."""
    c = serving("pp1", 1)
    c.run_chunks(1)
    c.pump(until=lambda: isinstance(c.front.head(), SendEnvelope) and c.ledger.received == c.ledger.sent)
    c.stall(1, FLOOR + 20)
    c.pump(until=lambda: not c.front.alive)
    failure = c.front.lifecycle.failure
    assert c.front.code == 1 and failure is not None and "did not take the envelope" in failure.reason
    assert c.engine.machine.chunk.poisoned and not c.ledger.farewell
    c.settle()


def test_leader_result_send_that_runs_out_is_fatal() -> None:
    """Found by the model: the front stalls while the leader sends a result; the send runs out. The leader
    used to ignore it (then asked for no next step); now it fails at once."""
    c = serving("pp1", 2)
    c.pump(until=lambda: in_flight(c))
    c.stall(0, FLOOR + W + 30)
    c.pump(ranks=[1, 2], until=lambda: isinstance(c.leader.head(), SendResult))
    c.pump(until=lambda: not c.leader.alive)
    failure = c.leader.lifecycle.failure
    assert c.leader.code == 1 and failure is not None and "ran out of time in replying" in failure.reason
    c.settle()


def test_startup_collective_past_the_process_group_timeout() -> None:
    """Found by the model: a rank stalls in the vote past the process-group timeout; the collective runs out
    (WaitExpired). The lifecycle used to reject the event (InvalidEvent); now every rank fails with a cause."""
    c = Cluster("pp1", 2)
    c.pump(until=lambda: c.procs[1].lifecycle.state == "voting")
    c.stall(2, 700)
    c.settle()
    assert exits(c) == [1, 1, 1]
    failure = c.procs[1].lifecycle.failure
    assert failure is not None and "timed out during voting" in failure.reason


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_kill_any_rank_mid_chunk(victim: int) -> None:
    """A rank dies with a chunk in the mesh: failure reaches every live rank."""
    c = serving("pp1", 2)
    c.pump(until=lambda: in_flight(c) and c.leader.leader.machine.state == "running")
    c.kill(victim)
    c.settle()
    assert c.procs[victim].code == -9
    assert all(code not in (None, 0) for code in exits(c))


@pytest.mark.parametrize("steps_before", range(0, 40, 3))
def test_sigterm_in_every_startup_state(steps_before: int) -> None:
    """SIGTERM on the front in any startup state fails it; every other rank then fails too (collective peer
    gone, a send to a lost peer, or a watchdog) -- nobody hangs."""
    c = Cluster("pp1", 2)
    for _ in range(steps_before):
        if c.step(0) is None:
            c.jump()
    c.signal(0)
    c.settle()
    if c.front.code == 0:  # startup had already finished: orderly
        assert exits(c) == [0, 0, 0]
    else:
        assert all(code != 0 for code in exits(c))


def test_sigterm_right_after_ready_is_kept() -> None:
    """A SIGTERM between READY and the first chunk drains at once (issue 11: it used to be lost): the chunk
    planned with READY goes out and is shown, then SHUTDOWN."""
    c = Cluster("pp1", 2)
    c.pump(until=lambda: c.front.lifecycle.state == "serving")
    assert c.signal(0) == "drain"
    c.settle()
    assert exits(c) == [0, 0, 0] and len(c.ledger.shown) <= 1


def test_stop_before_serving_is_kept() -> None:
    """The server's stop while the front still waits for READY is applied once serving starts."""
    c = Cluster("pp1", 2, warmup_chunks=2)
    c.pump(until=lambda: c.engine is not None and c.engine.machine.state == "awaiting_ready")
    c.stop()
    c.pump(until=lambda: c.job.all_exited())
    assert exits(c) == [0, 0, 0] and c.ledger.shown == []


def test_sigterm_with_chunk_in_flight_drains() -> None:
    """SIGTERM while a chunk is in flight: the chunk is received (and shown), then SHUTDOWN; every rank
    exits 0."""
    c = serving("pp1", 2)
    c.pump(until=lambda: in_flight(c))
    c.signal(0)
    c.settle()
    assert exits(c) == [0, 0, 0] and len(c.ledger.shown) == 1


@pytest.mark.parametrize("topology,rank", [("pp1", 2), ("pp1", 1), ("tp", 1)])
def test_sigterm_to_a_mesh_rank_drains_the_whole_job(topology: str, rank: int) -> None:
    """A SIGTERM to any one rank leads to an orderly drain of the whole job (exit 0) within 5 s: the rank
    publishes it on the job's store, the front's watcher reads it and drains the job."""
    c = serving(topology, 2, chunks=0, after_chunks="idle")
    t0 = c.job.now
    c.signal(rank)
    c.faults.clear()
    c.timing.clear()
    c.pump(until=lambda: c.job.all_exited() or c.job.now > t0 + 5)
    assert exits(c) == [0] * len(c.procs)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_config_mismatch_fails_every_rank_at_parity(rank: int) -> None:
    c = Cluster("pp1", 2, bad_config_rank=rank)
    c.settle()
    assert exits(c) == [1, 1, 1]
    assert all(p.lifecycle.failure is not None and "parity" in p.lifecycle.failure.reason for p in c.procs)


@pytest.mark.parametrize("topology,rank", [("pp1", 0), ("pp1", 2), ("tp", 0), ("tp", 1)])
def test_load_failure_fails_every_rank_at_the_vote(topology: str, rank: int) -> None:
    c = Cluster(topology, 2, load_fail_rank=rank)
    c.settle()
    assert all(code == 1 for code in exits(c))
    assert all(p.lifecycle.failure is not None and p.lifecycle.failure.phase == "voting" for p in c.procs)


@pytest.mark.parametrize("topology,rank", [("pp1", 2), ("tp", 1)])
def test_fingerprint_drift_fails_every_rank_at_the_barrier(topology: str, rank: int) -> None:
    c = Cluster(topology, 2, bad_fingerprint_rank=rank)
    c.settle()
    assert all(code == 1 for code in exits(c))
    assert all(p.lifecycle.failure is not None and "fingerprints differ" in p.lifecycle.failure.reason
               for p in c.procs)


def test_idle_front_heartbeats_keep_the_mesh_alive() -> None:
    """A headless front idle after its chunks (after_chunks=idle) for 100 s: NOOPs every H keep the leader's and the
    workers' watchdogs quiet."""
    c = serving("pp1", 3, chunks=1, after_chunks="idle")
    c.pump(until=lambda: c.job.now >= 100)
    assert all(p.alive for p in c.procs) and c.engine.machine.chunk.stats.noops >= 90
    c.settle()
    assert exits(c) == [0, 0, 0, 0]


def test_stalled_front_orphans_the_mesh() -> None:
    """The front stalls past the watchdog while idle: the mesh ranks exit orphaned (3); the front then finds
    the leader gone at its next send."""
    c = serving("pp1", 2, chunks=0, after_chunks="idle")
    c.stall(0, 2 * W)
    c.pump(until=lambda: c.job.all_exited())
    assert exits(c) == [1, 3, 3]


def test_model_detects_a_stale_show() -> None:
    """The model's own alarm works: showing a chunk of an older epoch is a violation (pure TP: the chunk is
    shown before the next one is planned)."""
    c = serving("tp", 1)
    c.pump(until=lambda: c.ledger.received == 1)
    c.ledger.epoch += 1  # the model believes a cut happened that the machine did not see
    with pytest.raises(ModelViolation, match="stale chunk shown"):
        c.run_chunks(1)


def test_model_flags_a_missed_deadline_without_a_fault() -> None:
    """The model's own alarm works: an envelope lost in transit (no fault injected) makes the front's deadline
    run out, which is a violation, not a fault."""
    c = serving("pp1", 1)
    c.pump(until=lambda: in_flight(c))
    pp = c.job.transport.pp
    assert pp is not None
    pp.inbox[1].clear()
    with pytest.raises(ModelViolation, match="without a fault"):
        c.pump(until=lambda: not c.front.alive)
