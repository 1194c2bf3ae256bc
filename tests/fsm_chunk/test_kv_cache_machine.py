"""Unit tests of the front's KV-cache machine (fsm/kv_cache.py)."""

from __future__ import annotations

import pytest

from pp1.fsm.base import InvalidEvent
from pp1.fsm.kv_cache import KV_STATES, KVCacheMachine


def test_fill_then_roll() -> None:
    kv = KVCacheMachine(0, window=6, chunk_frames=2)
    assert kv.state == "empty" and kv.context_frames() == 0
    assert [kv.store() for _ in range(4)] == ["filling", "filling", "rolling", "rolling"]
    assert kv.cached_frames == 6 and kv.timeline_frames == 8 and kv.is_full


def test_chunk_as_big_as_window_rolls_at_once() -> None:
    kv = KVCacheMachine(0, window=3, chunk_frames=3)
    assert kv.store() == "rolling"


def test_recompute_cycle() -> None:
    kv = KVCacheMachine(0, window=6, chunk_frames=3)
    with pytest.raises(InvalidEvent):
        kv.mark_recompute()  # nothing cached: nothing to recompute
    kv.store()
    kv.mark_recompute()
    assert kv.state == "needs_recompute"
    with pytest.raises(InvalidEvent):
        kv.store()  # the recomputing chunk must be planned first
    assert kv.begin_recompute() == 3 and kv.state == "recomputing"
    assert kv.store() == "rolling" and kv.cached_frames == 6


def test_reset_from_every_live_state() -> None:
    for prep in ([], ["store"], ["store", "store"], ["store", "mark_recompute"],
                 ["store", "mark_recompute", "begin_recompute"]):
        kv = KVCacheMachine(0, window=6, chunk_frames=3)
        for step in prep:
            getattr(kv, step)()
        assert kv.reset() == "empty" and kv.cached_frames == 0 and kv.timeline_frames == 0


def test_failed_is_sticky() -> None:
    kv = KVCacheMachine(0, window=6, chunk_frames=3)
    kv.fail_with("test", "local")
    for step in ("store", "reset", "mark_recompute"):
        with pytest.raises(InvalidEvent):
            getattr(kv, step)()
    assert kv.state == "failed"


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        KVCacheMachine(0, window=0, chunk_frames=3)


def test_every_state_event_pair_follows_the_table() -> None:
    for state in KV_STATES:
        for event in KVCacheMachine.events():
            kv = KVCacheMachine(0, window=6, chunk_frames=3)
            kv._machine.set_state(state)
            dest = KVCacheMachine.next_state(state, event)
            if dest is None:
                with pytest.raises(InvalidEvent):
                    kv.fire(event)
                assert kv.state == state
            else:
                assert kv.fire(event) == dest
