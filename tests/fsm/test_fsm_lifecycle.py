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
