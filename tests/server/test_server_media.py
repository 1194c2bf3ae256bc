"""The frame path's pieces alone: frames as numpy (torch or numpy in, bad shapes refused), the
bounded queue (drop oldest, counted), and the paced track's timestamps on a fake clock (no real
time: the clock moves only when the track sleeps)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from pp1.server.media import VIDEO_CLOCK, FrameQueue, PacedVideoTrack, frames_as_numpy


def test_frames_as_numpy_views_torch_and_refuses_bad_shapes() -> None:
    t = torch.zeros(12, 8, 8, 3, dtype=torch.uint8)
    arr = frames_as_numpy(t)
    assert arr.shape == (12, 8, 8, 3) and arr.dtype == np.uint8
    t[0, 0, 0, 0] = 7
    assert arr[0, 0, 0, 0] == 7  # a view: no copy on the way
    assert frames_as_numpy(np.ones((1, 4, 4, 3), np.uint8)).shape == (1, 4, 4, 3)
    for bad in (np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.float32), np.zeros((1, 4, 4, 4), np.uint8),
                torch.zeros(2, 4, 4, 3)):
        with pytest.raises(ValueError, match=r"uint8 \[F, H, W, 3\]"):
            frames_as_numpy(bad)


def test_queue_drops_the_oldest_and_counts() -> None:
    async def run() -> None:
        q = FrameQueue(3)
        frames = [np.full((1, 1, 3), i, np.uint8) for i in range(5)]
        dropped = [q.put(f) for f in frames]
        assert dropped == [0, 0, 0, 1, 1] and q.dropped == 2 and len(q) == 3
        got = [int((await q.get())[0, 0, 0]) for _ in range(3)]
        assert got == [2, 3, 4] and len(q) == 0
        waiter = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        q.put(frames[0])
        assert int((await waiter)[0, 0, 0]) == 0

    asyncio.run(run())
    with pytest.raises(ValueError):
        FrameQueue(0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_track_paces_at_fps_and_resumes_at_real_time_after_a_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    real_sleep = asyncio.sleep

    async def fake_sleep(s: float, *a: object) -> None:
        clock.now += s
        await real_sleep(0)

    monkeypatch.setattr("pp1.server.media.asyncio.sleep", fake_sleep)

    async def run() -> None:
        q = FrameQueue(100)
        track = PacedVideoTrack(q, fps=25.0, clock=clock)
        step = VIDEO_CLOCK // 25
        frame = np.zeros((8, 8, 3), np.uint8)
        for _ in range(10):
            q.put(frame)
        pts, times = [], []
        for _ in range(10):
            f = await track.recv()
            pts.append(f.pts)
            times.append(clock.now)
        assert pts == [i * step for i in range(10)]
        assert times[-1] - times[0] == pytest.approx(9 / 25)  # one frame every 1/fps
        # the queue ran dry for 2 s: the next frame is stamped at real time (a pause, not a fast-forward)
        clock.now += 2.0
        q.put(frame)
        q.put(frame)
        a = await track.recv()
        b = await track.recv()
        assert a.pts == pytest.approx(round((clock.now - 100.0 - 1 / 25) * VIDEO_CLOCK), abs=2)
        assert b.pts - a.pts == step
        assert track.sent == 12 and track.fps_sent() is not None

    asyncio.run(run())


def test_a_newer_epochs_frames_supersede_an_older_ones_still_queued() -> None:
    """A hard cut restarts the video: when its first frames come, what is left of the older epoch in each
    viewer's queue goes (counted apart from the full-queue drops), so the new prompt shows at once."""
    import types

    from pp1.server.core import ServerCore
    from pp1.server.front_api import FrameBatch
    from pp1.server.settings import ServerSettings
    from pp1.testing.fake_front import FakeFront

    front = FakeFront(width=8, height=8, fps=16.0, chunk_frames=4)
    try:
        core = ServerCore(front, ServerSettings())
        core.machine = types.SimpleNamespace(forwards_frames=True)  # type: ignore[assignment]  # a live session
        q = FrameQueue(capacity=32)
        core.peers = {"v": types.SimpleNamespace(closed=False, queue=q)}  # type: ignore[dict-item]

        def batch(epoch: int, value: int) -> FrameBatch:
            return FrameBatch(frames=np.full((4, 8, 8, 3), value, np.uint8), chunk_index=0, cache_epoch=epoch,
                              call_id=epoch, t_decoded=0.0)

        core._deliver(batch(1, 10))
        core._deliver(batch(1, 11))
        assert len(q) == 8 and q.superseded == 0
        core._deliver(batch(2, 20))
        assert len(q) == 4 and q.superseded == 8 and q.dropped == 0
        assert all(int(f[0, 0, 0]) == 20 for f in q._frames)
        core._deliver(batch(2, 21))
        assert len(q) == 8 and q.superseded == 8
    finally:
        front.close()
