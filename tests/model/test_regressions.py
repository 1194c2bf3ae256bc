"""Scripted runs of the whole cluster (model_cluster): what the model test caught on the way, kept
as explicit regressions, and the scenarios the protocol must always get right. (The Hypothesis runs
-- ci, and 1500 random examples x 30 steps per topology -- found no violation in the machines.)

Each test says what it pins down. ``c.do(name)`` takes one named step (error if not enabled);
``settle()`` drives the run to its end and checks the end state (every rank exited; no fault ->
all exit 0; front exit 0 -> every envelope answered).
"""

from __future__ import annotations

import pytest
from model_cluster import FLOOR, Cluster, ModelViolation

pytestmark = pytest.mark.timeout(60)


def serving(topology: str = "pp1", m: int = 2, **kw: object) -> Cluster:
    c = Cluster(topology, m, **kw)  # type: ignore[arg-type]
    c.run_until_serving()
    assert c.front.life.state == "serving", c.describe()
    return c


def exits(c: Cluster) -> list[int | None]:
    return [p.exit_code for p in c.procs]


@pytest.mark.parametrize("topology,m", [("pp1", 1), ("pp1", 2), ("pp1", 4), ("tp", 1), ("tp", 3)])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_clean_run_every_topology(topology: str, m: int, k: int) -> None:
    """Startup, 7 chunks (recompute on schedule), SIGTERM, every rank exits 0."""
    c = serving(topology, m, recompute_every=k, warmup_chunks=2)
    c.run_chunks(7)
    assert [i for _, i in c.ledger.emitted] == list(range(7))
    assert c.ledger.recomputes == (0 if k == 0 else sum(1 for i in range(1, 7) if i % k == 0))
    c.settle()
    assert exits(c) == [0] * len(c.procs)


def test_hard_cut_with_chunk_in_flight_pp1() -> None:
    """The in-flight result is received and discarded; the new epoch's chunk 0 (reset_cache) passes
    the leader's epoch fence; nothing of the old epoch is emitted after the cut."""
    c = serving("pp1", 2)
    c.run_chunks(2)
    c.do("front submit")
    c.do("leader recv")
    c.hard_cut()
    assert c.front.chunk is not None and c.front.chunk.state == "cutting"
    c.do("r2 recv")
    c.do("mesh compute")
    c.do("front recv")
    assert c.front.chunk.stats.discarded_stale == 1
    c.run_chunks(2)
    assert c.ledger.emitted[-2:] == [(1, 0), (1, 1)]
    c.settle()
    assert exits(c) == [0, 0, 0]


def test_cut_while_result_is_queued() -> None:
    """A cut after the result was already sent (queued at the front): still discarded as stale."""
    c = serving("pp1", 1)
    c.do("front submit")
    c.do("leader recv")
    c.do("mesh compute")
    c.hard_cut()
    c.do("front recv")
    assert c.ledger.emitted == []
    c.run_chunks(1)
    assert c.ledger.emitted == [(1, 0)]
    c.settle()


def test_invalid_envelope_is_answered_then_retried() -> None:
    """A corrupt (invalid) envelope is answered ok=False by the leader, never relayed; the front
    hard-cuts and retries once, and the retry succeeds."""
    c = serving("pp1", 2)
    c.corrupt_next = "invalid"
    c.do("front submit")
    c.do("leader recv")
    assert not c.q["tp2"], "an invalid envelope must never reach the workers"
    c.do("front recv")
    assert c.ledger.retries == 1
    c.run_chunks(1)
    assert c.ledger.emitted == [(1, 0)]
    c.settle()
    assert c.front.exit_code == 0


def test_two_failures_in_a_row_fail_the_mesh_with_farewell() -> None:
    """Retry once; the second failure in a row fails the front, which sends a best-effort SHUTDOWN
    (channel clean) so the workers exit 0 instead of waiting for their watchdog."""
    c = serving("pp1", 3)
    for _ in range(2):
        c.chunk_fault = "recoverable"
        c.do("front submit")
        c.do("leader recv")
        c.do("r2 recv")
        c.do("r3 recv")
        c.do("mesh compute")
        c.do("front recv")
    assert c.front.exit_code == 1 and c.ledger.farewell
    c.settle()
    assert exits(c)[2:] == [0, 0]


def test_altered_ids_trip_the_front() -> None:
    """Caught while building the model test (the first "invalid envelope" fault altered chunk_index
    and was expected to be rejected): an envelope whose ids were altered in transit looks valid to
    the leader (it cannot know the schedule), is relayed and computed; only the front's tripwire
    (result chunk_index != sent) stops it, and it must fail loudly rather than show a wrong chunk."""
    c = serving("pp1", 2)
    c.corrupt_next = "ids"
    c.do("front submit")
    c.do("leader recv")
    c.do("r2 recv")
    c.do("mesh compute")
    c.do("front recv")
    assert c.front.exit_code == 1 and c.ledger.emitted == []
    failure = c.front.life.failure
    assert failure is not None and "id_mismatch" in failure.reason
    c.settle()


def test_garbage_frame_kills_leader_front_fails_fast() -> None:
    """An undecodable frame poisons the leader's channel (exit 1); the front's receive fails on
    the closed channel (no waiting for the deadline); the workers follow."""
    c = serving("pp1", 2)
    c.corrupt_next = "garbage"
    c.do("front submit")
    c.do("leader recv")
    assert not c.leader.alive
    c.do("front leader gone")
    assert c.now == 0.0 and c.front.exit_code == 1
    c.settle()


def test_result_after_deadline_fails_poisoned() -> None:
    """No result by the deadline: the front fails, its channel poisoned (no farewell SHUTDOWN);
    the late result is never read; every other rank ends."""
    c = serving("pp1", 2)
    c.do("front submit")
    c.tick(FLOOR + 1)
    c.do("front deadline")
    assert c.front.chunk is not None and c.front.chunk.poisoned and not c.ledger.farewell
    c.settle()
    assert all(code != 0 for code in exits(c)[:2])


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_kill_any_rank_mid_chunk(victim: int) -> None:
    """A rank dies with a chunk in the mesh: failure reaches every live rank."""
    c = serving("pp1", 2)
    c.do("front submit")
    c.do("leader recv")
    c.kill(victim)
    c.settle()
    assert c.procs[victim].exit_code == -9
    assert all(code not in (None, 0) for code in exits(c))


@pytest.mark.parametrize("steps_before", range(0, 14))
def test_sigterm_in_every_startup_state(steps_before: int) -> None:
    """SIGTERM on the front in any startup state fails it; every other rank then fails too
    (collective peer gone, leader's send fails, or watchdog) -- nobody hangs."""
    c = Cluster("pp1", 2)
    for _ in range(steps_before):
        c.step(0)
    c.sigterm()
    c.settle()
    if steps_before and c.front.exit_code == 0:  # startup had already finished: orderly
        assert exits(c) == [0, 0, 0]


def test_sigterm_with_chunk_in_flight_drains() -> None:
    """SIGTERM while a chunk is in flight: the chunk is received (and shown), then SHUTDOWN;
    every rank exits 0."""
    c = serving("pp1", 2)
    c.do("front submit")
    c.sigterm()
    assert c.front.chunk is not None and c.front.chunk.state == "draining"
    c.settle()
    assert exits(c) == [0, 0, 0] and len(c.ledger.emitted) == 1


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_config_mismatch_fails_every_rank_at_parity(rank: int) -> None:
    c = Cluster("pp1", 2, bad_config_rank=rank)
    c.settle()
    assert exits(c) == [1, 1, 1]
    assert all(p.life.failure is not None and "parity" in p.life.failure.reason for p in c.procs)


@pytest.mark.parametrize("topology,rank", [("pp1", 0), ("pp1", 2), ("tp", 0), ("tp", 1)])
def test_load_failure_fails_every_rank_at_the_vote(topology: str, rank: int) -> None:
    c = Cluster(topology, 2, load_fail_rank=rank)
    c.settle()
    assert all(code == 1 for code in exits(c))
    assert all(p.life.failure is not None and p.life.failure.phase == "voting" for p in c.procs)


def test_idle_front_heartbeats_keep_the_mesh_alive() -> None:
    """Not streaming for 100 s: NOOPs every H keep the leader's and workers' watchdogs quiet."""
    c = serving("pp1", 3)
    c.streaming = False
    while c.now < 100:
        if not c.step(0):
            c.now = min(c.timers())
    assert all(p.alive for p in c.procs) and c.front.chunk is not None and c.front.chunk.stats.noops >= 90
    c.settle()
    assert exits(c) == [0, 0, 0, 0]


def test_stalled_front_orphans_the_mesh() -> None:
    """Time jumps past the watchdog with the front idle (a stall): the mesh ranks exit orphaned (3);
    the front then finds the leader gone at its next send."""
    c = serving("pp1", 2)
    c.streaming = False
    c.tick(6.0)
    assert c.faults and c.faults[-1].startswith("stall")
    c.do("leader watchdog")
    c.do("r2 watchdog")
    c.do("front noop")  # the send fails: the leader is gone
    assert c.front.exit_code == 1
    c.settle()
    assert exits(c)[1:] == [3, 3]


def test_model_detects_a_stale_emit() -> None:
    """The model's own alarm works: emitting a result of an older epoch is a violation."""
    c = serving("pp1", 1)
    c.do("front submit")
    c.ledger.epoch += 1  # the model believes a cut happened that the machine did not see
    c.do("leader recv")
    c.do("mesh compute")
    with pytest.raises(ModelViolation, match="stale emit"):
        c.do("front recv")
