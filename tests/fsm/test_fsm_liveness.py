"""The device liveness watch alone: a silent, failed or stalled peer fails this rank only while a
device op of this rank is outstanding; the cause is remote and blames the peer."""

from __future__ import annotations

import pytest

from pp1.fsm.base import FAILED, InvalidEvent
from pp1.fsm.events import DeviceWait, LivenessObserved, PeerBeat
from pp1.fsm.intents import EXIT_FAILED, Exit
from pp1.fsm.liveness import SILENT_S, STALL_S, DeviceLivenessMachine

ALL_REDUCE = DeviceWait(group="mesh_dev", members=(1, 2), purpose="tp_all_reduce", since=10.0, seq=7)
RECV = DeviceWait(group="pair_dev", members=(0, 1), purpose="pp_tensors", since=10.0)


def beat(mark: int, seq: int | None = 7, state: str = "serving") -> PeerBeat:
    return PeerBeat(mark=str(mark), state=state, seqs={} if seq is None else {"mesh_dev": seq})


def observe(m: DeviceLivenessMachine, now: float, waits: tuple[DeviceWait, ...], **peers: PeerBeat | None):
    return m.handle(LivenessObserved(now, waits, {int(k[1:]): v for k, v in peers.items()}))


def test_live_peers_never_fail_a_long_wait() -> None:
    m = DeviceLivenessMachine(1, [0, 2], started_at=0.0)
    for i in range(100):  # 50 s inside one all-reduce, peers beating and in it too
        assert observe(m, 10.0 + 0.5 * i, (ALL_REDUCE,), r0=beat(i, None), r2=beat(i, 7)) == []
    assert m.state == "waiting" and m.failure is None


def test_a_silent_peer_fails_the_wait_blaming_it() -> None:
    m = DeviceLivenessMachine(1, [0, 2], started_at=0.0)
    assert observe(m, 10.0, (ALL_REDUCE,), r0=beat(1), r2=beat(1)) == []
    assert observe(m, 10.0 + SILENT_S - 0.5, (ALL_REDUCE,), r0=beat(2), r2=beat(1)) == []
    out = observe(m, 10.0 + SILENT_S, (ALL_REDUCE,), r0=beat(3), r2=beat(1))
    assert out and isinstance(out[-1], Exit) and out[-1].code == EXIT_FAILED
    assert m.state == FAILED and m.failure is not None
    assert (m.failure.kind, m.failure.blame, m.failure.phase) == ("remote", 2, "waiting")
    assert "rank 2 is silent" in m.failure.reason and "tp_all_reduce on mesh_dev (#7)" in m.failure.reason
    with pytest.raises(InvalidEvent):
        observe(m, 20.0, (), r0=beat(4), r2=beat(1))


def test_silence_without_an_outstanding_device_op_is_not_this_watchs_business() -> None:
    m = DeviceLivenessMachine(1, [2], started_at=0.0)
    for t in range(0, 60):
        assert observe(m, float(t), (), r2=beat(1)) == []
    assert m.state == "watching"
    # once a wait begins, a peer that has been silent all along is judged at once
    assert observe(m, 61.0, (ALL_REDUCE,), r2=beat(1))


def test_a_peer_never_seen_is_silent_from_the_start_of_the_watch() -> None:
    m = DeviceLivenessMachine(1, [2], started_at=5.0)
    assert observe(m, 5.0 + SILENT_S - 0.1, (ALL_REDUCE,), r2=None) == []
    assert observe(m, 5.0 + SILENT_S, (ALL_REDUCE,), r2=None)
    assert m.failure is not None and m.failure.blame == 2


def test_a_failed_peer_fails_the_wait_at_once() -> None:
    m = DeviceLivenessMachine(0, [1], started_at=0.0)
    assert observe(m, 10.0, (RECV,), r1=beat(1, None, state=FAILED))
    assert m.failure is not None and m.failure.blame == 1 and "rank 1 failed" in m.failure.reason


def test_a_live_peer_that_does_not_enter_the_collective_is_stalled() -> None:
    m = DeviceLivenessMachine(1, [2], started_at=0.0)
    assert observe(m, 10.0, (ALL_REDUCE,), r2=beat(1, seq=6)) == []
    for i in range(2, 10):  # it beats, but stays at collective #6
        t = 10.0 + 0.5 * i
        out = observe(m, t, (ALL_REDUCE,), r2=beat(i, seq=6))
        assert (out != []) == (t - 10.0 >= STALL_S), t
    m2 = DeviceLivenessMachine(1, [2], started_at=0.0)  # behind but moving (a collective every 4 s): not stalled
    for i in range(40):
        assert observe(m2, 10.0 + 0.5 * i, (ALL_REDUCE,), r2=beat(i, seq=min(3 + i // 8, 7))) == []
    # a wait with no collective number (p2p) has no stall verdict
    m3 = DeviceLivenessMachine(1, [2], started_at=0.0)
    for i in range(30):
        assert observe(m3, 10.0 + 0.5 * i, (RECV,), r2=beat(i, seq=6)) == []


def test_the_wait_state_follows_the_outstanding_ops() -> None:
    m = DeviceLivenessMachine(1, [2], started_at=0.0)
    observe(m, 1.0, (ALL_REDUCE,), r2=beat(1))
    assert m.state == "waiting"
    observe(m, 1.5, (), r2=beat(2))
    assert m.state == "watching"


def test_only_the_groups_members_are_judged() -> None:
    m = DeviceLivenessMachine(1, [0, 2], started_at=0.0)  # the leader: the front (0) is not in the mesh group
    for i in range(20):
        assert observe(m, 10.0 + 0.5 * i, (ALL_REDUCE,), r0=beat(1, None, state=FAILED), r2=beat(i)) == []
    assert observe(m, 30.0, (RECV,), r0=beat(1, None, state=FAILED), r2=beat(99))  # the front's pair op: judged
    assert m.failure is not None and m.failure.blame == 0
