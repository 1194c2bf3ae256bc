"""The session slot alone (pp1.fsm.session): admission, the intents of each event, peers that are
not the session, and the terminal states. Every (state, event) pair of its table is covered by
test_fsm_tables.py through the diagram registry."""

from __future__ import annotations

import pytest

from pp1.fsm.base import InvalidEvent
from pp1.fsm.session import (
    CloseAllPeers,
    ClosePeer,
    Negotiate,
    SessionMachine,
    ShutdownFront,
    StartFront,
    StopFront,
)


def streaming(sid: str = "s1") -> SessionMachine:
    m = SessionMachine()
    assert m.offer_refusal() is None
    assert m.on_offer(sid) == [Negotiate(sid)]
    assert m.on_answered(sid) == [StartFront(sid)]
    assert m.on_peer_connected(sid) == []
    assert m.state == "streaming" and m.live and m.forwards_frames
    return m


def test_one_session_at_a_time() -> None:
    m = SessionMachine()
    assert not m.forwards_frames and m.parameters_refusal().code == "no_session"  # type: ignore[union-attr]
    m.on_offer("s1")
    assert m.state == "negotiating" and m.live and m.forwards_frames and m.parameters_refusal() is None
    refusal = m.offer_refusal()
    assert refusal is not None and refusal.code == "busy" and "s1" in refusal.reason
    with pytest.raises(InvalidEvent):
        m.on_offer("s2")
    assert m.state == "negotiating" and m.session_id == "s1"
    assert m.watch_refusal() is None


def test_rejected_offer_frees_the_slot() -> None:
    m = SessionMachine()
    m.on_offer("s1")
    assert m.on_rejected("other", "x") == [] and m.state == "negotiating"
    assert m.on_rejected("s1", "bad SDP") == [ClosePeer("s1", "bad SDP")]
    assert m.state == "idle" and m.session_id is None and m.offer_refusal() is None


def test_session_peer_gone_stops_the_front_then_frees_the_slot() -> None:
    m = streaming()
    assert m.on_peer_gone("s1", "DELETE") == [StopFront(), ClosePeer("s1", "DELETE")]
    assert m.state == "closing" and not m.forwards_frames
    assert m.offer_refusal().code == "closing"  # type: ignore[union-attr]
    assert m.on_peer_gone("s1", "closed again") == [ClosePeer("s1", "closed again")]  # idempotent
    assert m.on_closed("s1") == [] and m.state == "idle" and m.session_id is None


def test_watchers_never_move_the_slot() -> None:
    m = streaming()
    assert m.on_peer_connected("w1") == [] and m.state == "streaming"
    assert m.on_peer_gone("w1", "left") == [ClosePeer("w1", "left")] and m.state == "streaming"
    assert m.on_closed("w1") == [] and m.state == "streaming"
    assert m.on_negotiation_timeout("w1", "late") == []


def test_negotiation_timeout_only_while_negotiating() -> None:
    m = streaming()
    assert m.on_negotiation_timeout("s1", "late") == []
    m2 = SessionMachine()
    m2.on_offer("s1")
    assert m2.on_negotiation_timeout("s1", "late") == [StopFront(), ClosePeer("s1", "late")]
    assert m2.state == "closing"


@pytest.mark.parametrize("where", ["idle", "negotiating", "streaming", "closing"])
def test_mesh_failure_is_terminal_with_its_cause(where: str) -> None:
    m = SessionMachine()
    if where != "idle":
        m.on_offer("s1")
    if where in ("streaming", "closing"):
        m.on_peer_connected("s1")
    if where == "closing":
        m.on_peer_gone("s1", "bye")
    assert m.state == where
    assert m.on_front_ended("mesh_failed: rank 1 lost", failed=True) == [CloseAllPeers("mesh_failed: rank 1 lost", True)]
    assert m.state == "failed" and m.failure is not None and m.failure.phase == where
    assert m.failure.kind == "remote" and "rank 1 lost" in m.failure.reason
    for refusal in (m.offer_refusal(), m.watch_refusal(), m.parameters_refusal()):
        assert refusal is not None and refusal.code == "failed"
    assert m.on_shutdown("SIGTERM") == [] and m.on_front_ended("again", failed=False) == []
    assert m.on_peer_gone("s1", "x") == [ClosePeer("s1", "x")] and m.state == "failed"


def test_shutdown_closes_everything_and_drains_the_job() -> None:
    m = streaming()
    assert m.on_shutdown("SIGTERM") == [CloseAllPeers("SIGTERM", False), ShutdownFront("SIGTERM")]
    assert m.state == "shutdown" and m.admits_nothing and not m.forwards_frames
    for refusal in (m.offer_refusal(), m.watch_refusal(), m.parameters_refusal()):
        assert refusal is not None and refusal.code == "shutting_down"
    assert m.on_shutdown("again") == []


def test_front_ending_for_shutdown_closes_peers_without_asking_again() -> None:
    m = streaming()
    assert m.on_front_ended("shutdown", failed=False) == [CloseAllPeers("shutdown", False)]
    assert m.state == "shutdown" and m.failure is None
