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
