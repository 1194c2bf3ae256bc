"""The rank lifecycles (fsm/lifecycle.py): normal runs per role and the error paths."""

from __future__ import annotations

import pytest

from pp1.fsm.base import InvalidEvent
from pp1.fsm.lifecycle import LIFECYCLES, LifecycleMachine, make_lifecycle
from pp1.protocol.config import RunConfig

STARTUP_MESH = ["start", "parity_ok", "loaded", "vote_ok", "fingerprint_ok", "barrier_done", "channels_warm",
                "warmup_done"]
STARTUP_FRONT = [e for e in STARTUP_MESH if e != "fingerprint_ok"]
NORMAL_RUNS = {
    "front": (STARTUP_FRONT + ["drain", "drained"], "shutdown"),
    "tp_rank0": (STARTUP_MESH + ["drain", "drained"], "shutdown"),
    "leader": (STARTUP_MESH + ["shutdown_received"], "shutdown"),
    "worker": (STARTUP_MESH + ["drain", "shutdown_received"], "shutdown"),
}


@pytest.mark.parametrize("role", sorted(NORMAL_RUNS))
def test_normal_run(role: str) -> None:
    events, final = NORMAL_RUNS[role]
    m = make_lifecycle(role, rank=3, mesh_rank=1)
    assert m.state == "init" and role == m.ROLE and m.ctx["role"] == role
    for e in events:
        m.fire(e)
    assert m.state == final and m.is_terminal and m.failure is None


def test_only_mesh_roles_check_fingerprints() -> None:
    assert "fingerprint" not in LIFECYCLES["front"].STATES
    for role in ("leader", "worker", "tp_rank0"):
        m = make_lifecycle(role, 1)
        for e in ["start", "parity_ok", "loaded", "vote_ok"]:
            m.fire(e)
        assert m.state == "fingerprint"


def test_states_named_as_designed() -> None:
    expected = ["init", "parity", "loading", "voting", "fingerprint", "barrier", "warming_channels", "warmup",
                "serving", "draining", "shutdown", "failed"]
    for cls in LIFECYCLES.values():
        assert [s for s in expected if s in cls.STATES] == cls.STATES
        assert set(cls.BINDINGS) == set(cls.STATES), f"{cls.NAME}: every state documents its adapter call"


def _to(role: str, state: str) -> LifecycleMachine:
    m = make_lifecycle(role, 2)
    events, _ = NORMAL_RUNS[role]
    for e in events:
        if m.state == state:
            break
        m.fire(e)
    assert m.state == state
    return m


def test_own_load_failure_still_votes_then_fails_locally() -> None:
    m = _to("worker", "loading")
    assert m.on_loaded(False, "CUDA out of memory") == 0
    assert m.state == "voting"  # a rank whose load failed still votes
    m.on_vote(0)
    assert m.state == "failed"
    assert m.failure is not None and m.failure.kind == "local" and m.failure.phase == "voting"
    assert "CUDA out of memory" in m.failure.reason


def test_other_ranks_load_failure_fails_remotely() -> None:
    m = _to("front", "loading")
    assert m.on_loaded(True) == 1
    m.on_vote(0, "rank 2: CUDA out of memory")
    assert m.state == "failed" and m.failure is not None
    assert m.failure.kind == "remote" and "rank 2" in m.failure.reason


def test_vote_ok() -> None:
    m = _to("leader", "loading")
    m.on_loaded(True)
    assert m.on_vote(1) == "fingerprint"


@pytest.mark.parametrize("role", sorted(NORMAL_RUNS))
def test_drain_only_while_serving(role: str) -> None:
    m = _to(role, "warmup")
    with pytest.raises(InvalidEvent):
        m.fire("drain")
    assert m.state == "warmup"


def test_front_does_not_take_shutdown_received_and_mesh_does_not_take_drained() -> None:
    front = _to("front", "serving")
    with pytest.raises(InvalidEvent):
        front.fire("shutdown_received")
    leader = _to("leader", "serving")
    leader.fire("drain")
    with pytest.raises(InvalidEvent):
        leader.fire("drained")
    assert leader.state == "draining"


def test_out_of_order_event_leaves_state() -> None:
    m = _to("worker", "parity")
    with pytest.raises(InvalidEvent) as err:
        m.fire("barrier_done")
    assert m.state == "parity" and err.value.code == "invalid_event"


def test_parity_failure_records_phase() -> None:
    m = _to("tp_rank0", "parity")
    m.fail_with("rank 1 vs rank 0: preset: 'tiny' != 'wan14b'", "remote")
    assert m.state == "failed" and m.failure is not None and m.failure.phase == "parity"


def test_make_lifecycle_unknown_role() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        make_lifecycle("stage1", 0)


def test_role_of() -> None:
    pp1 = RunConfig(topology="pp1", world_size=4, mesh_global_ranks=(1, 2, 3))
    assert [pp1.role_of(r) for r in range(4)] == ["front", "leader", "worker", "worker"]
    tp = RunConfig(topology="tp", world_size=2, mesh_global_ranks=(0, 1))
    assert [tp.role_of(r) for r in range(2)] == ["tp_rank0", "worker"]
    assert [tp.hosts_front(r) for r in range(2)] == [True, False]
    odd = RunConfig(topology="pp1", world_size=3, mesh_global_ranks=(2, 1))
    assert odd.role_of(2) == "leader"  # the leader is mesh_global_ranks[0], not rank 1
    with pytest.raises(ValueError):
        pp1.role_of(5)


@pytest.mark.parametrize("role", sorted(NORMAL_RUNS))
def test_signal_verdict_per_state(role: str) -> None:
    """A signal drains from the channels' warm-up on (kept until serving), is ignored while draining or ended,
    and fails the rank inside the startup collectives."""
    events, _ = NORMAL_RUNS[role]
    m = make_lifecycle(role, 1)
    for e in events:
        assert m.signal_verdict() == ("drain" if m.state in ("warming_channels", "warmup", "serving") else
                                      "ignore" if m.state == "draining" else "fail"), m.state
        m.fire(e)
    assert m.signal_verdict() == "ignore"


@pytest.mark.parametrize("role", ["front", "leader", "worker", "tp_rank0"])
def test_a_signal_to_a_failed_job_fails_at_once(role: str) -> None:
    """Another rank failed (torchrun tears the job down with SIGTERM): no drain could finish, so a signal
    fails the rank in every state but the terminal ones, draining included."""
    events, _ = NORMAL_RUNS[role]
    m = make_lifecycle(role, 1)
    for e in events:
        assert m.signal_verdict(job_failed=True) == "fail", m.state
        m.fire(e)
    assert m.signal_verdict(job_failed=True) == "ignore"


def test_drain_bounds() -> None:
    from pp1.fsm.lifecycle import MESH_DRAIN_S, drain_bound_s

    cfg = RunConfig(heartbeat_s=1.0, watchdog_s=5.0, deadline_floor_s=30.0)
    assert drain_bound_s(cfg, hosts_front=True) == 2 * 30 + 2 * 1 + 5
    assert drain_bound_s(cfg, hosts_front=True, deadline_s=40.0) == 2 * 40 + 2 * 1 + 5
    assert drain_bound_s(cfg, hosts_front=False) == MESH_DRAIN_S + 1


@pytest.mark.parametrize("role", ["front", "leader", "worker", "tp_rank0"])
def test_a_peer_lost_in_startup_fails_the_rank_blaming_it(role: str) -> None:
    """``PeerGone`` carries the peer when the channel knows it (the executor fills it in): the lifecycle takes
    it in every startup state and blames that rank."""
    from pp1.fsm.events import PeerGone

    m = _startup(role, 1)
    out = m.handle(PeerGone("connection closed", peer=2))
    assert m.state == "failed" and m.failure is not None
    assert m.failure.kind == "remote" and m.failure.blame == 2 and out and out[-1].code != 0


def _startup(role: str = "worker", rank: int = 1) -> LifecycleMachine:
    from pp1.fsm.intents import GatherConfigs, InitWorld

    m = make_lifecycle(role, rank)
    assert m.start({"k": 1}) == [InitWorld()]
    assert m.on_world_ready() == [GatherConfigs({"k": 1})]
    return m


@pytest.mark.parametrize("mine,kind", [({"k": 2}, "local"), ({"k": 1}, "remote")])
def test_parity_blames_the_rank_whose_config_differs(mine: dict[str, int], kind: str) -> None:
    from pp1.fsm.intents import EXIT_FAILED, Exit

    m = make_lifecycle("worker", 1)
    m.start(mine)
    m.on_world_ready()
    configs = [{"k": 1}, mine] if kind == "local" else [{"k": 1}, {"k": 3}]
    (ex,) = m.on_configs(configs)
    assert isinstance(ex, Exit) and ex.code == EXIT_FAILED
    assert m.failure is not None and m.failure.kind == kind and "parity" in m.failure.reason


def test_intent_driven_startup_to_warming_channels() -> None:
    from pp1.fsm.intents import Barrier, GatherFingerprints, InitGroups, Load, Vote

    m = _startup()
    assert m.on_configs([{"k": 1}, {"k": 1}]) == [InitGroups()]
    assert m.on_groups_ready() == [Load()]
    assert m.on_load_done(True, fingerprint="fp") == [Vote(1, None)]
    assert m.on_vote_counted(1, []) == [GatherFingerprints("fp")]
    assert m.on_fingerprints(["fp", "fp"]) == [Barrier(1)]
    assert m.on_barrier(1) == [] and m.state == "warming_channels"


def test_fingerprint_drift_fails_every_rank_at_the_barrier() -> None:
    from pp1.fsm.intents import Barrier, Exit

    m = _startup()
    m.on_configs([{"k": 1}, {"k": 1}])
    m.on_groups_ready()
    m.on_load_done(True, fingerprint="fp")
    m.on_vote_counted(1, [])
    assert m.on_fingerprints(["fp", "other"]) == [Barrier(0)]
    assert isinstance(m.on_barrier(0)[-1], Exit) and m.failure is not None and m.failure.kind == "local"
    front = _startup("front", 0)
    front.on_configs([{"k": 1}, {"k": 1}])
    front.on_groups_ready()
    front.on_load_done(True)
    assert front.on_vote_counted(1, []) == [Barrier(1)]
    assert isinstance(front.on_barrier(0)[-1], Exit) and front.failure is not None
    assert front.failure.kind == "remote" and "fingerprints differ" in front.failure.reason


def test_a_failed_load_votes_zero_and_names_the_cause() -> None:
    from pp1.fsm.intents import Exit, Vote

    m = _startup()
    m.on_configs([{"k": 1}, {"k": 1}])
    m.on_groups_ready()
    assert m.on_load_done(False, reason="no weights") == [Vote(0, "no weights")]
    (ex,) = m.on_vote_counted(0, [None, "no weights"])
    assert isinstance(ex, Exit) and m.failure is not None and m.failure.kind == "local"


def test_a_startup_collective_that_runs_out_fails_the_rank() -> None:
    m = _startup()
    (ex,) = m.on_timed_out(600.0)
    assert ex.code == 1 and m.state == "failed" and "timed out" in m.failure.reason  # type: ignore[union-attr]
