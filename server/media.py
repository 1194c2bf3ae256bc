"""Frames from the front to each viewer's video track: a bounded queue per viewer (drop oldest,
counted; a newer epoch's frames supersede what is left of an older one) and a track that paces frames at
the stream's frame rate.

Everything here runs on the server's event-loop thread; frames arrive there from the front's
comms thread through ``loop.call_soon_threadsafe`` (``pp1.server.core``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack

VIDEO_CLOCK = 90_000  # RTP video clock (Hz)
TIME_BASE = Fraction(1, VIDEO_CLOCK)


def frames_as_numpy(frames: Any) -> np.ndarray:
    """A FrameBatch's frames as a uint8 [F, H, W, 3] numpy array (a CPU torch tensor is viewed, not copied)."""
    arr = frames.numpy() if hasattr(frames, "numpy") and not isinstance(frames, np.ndarray) else frames
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return arr


class FrameQueue:
    """A bounded FIFO of frames for one viewer: when full, the oldest frame is dropped (counted), so
    a slow viewer never builds a backlog. Loop thread only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._frames: deque[np.ndarray] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0
        self.superseded = 0  # frames of an older epoch dropped when a newer epoch's frames came
        self.put_total = 0

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: np.ndarray) -> int:
        """Queue one frame; returns how many old frames were dropped to make room (0 or 1)."""
        dropped = 0
        if len(self._frames) >= self.capacity:
            self._frames.popleft()
            self.dropped += 1
            dropped = 1
        self._frames.append(frame)
        self.put_total += 1
        self._ready.set()
        return dropped

    def supersede(self) -> int:
        """Drop every queued frame: a newer epoch's frames came (after a hard cut, the video jumps anyway; the
        older frames would only delay the new ones). Returns how many were dropped (counted apart)."""
        n = len(self._frames)
        self._frames.clear()
        self.superseded += n
        return n

    async def get(self) -> np.ndarray:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()


class PacedVideoTrack(MediaStreamTrack):
    """A video track that sends its queue's frames at ``fps``: frame n is due at t0 + n / fps. When
    the queue ran dry (the mesh is slower than fps, or the stream is paused) the timestamps jump to
    real time, so the browser shows a pause rather than fast-forwarding a burst."""

    kind = "video"

    def __init__(self, queue: FrameQueue, fps: float, *, clock: Any = time.monotonic) -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.queue = queue
        self.fps = fps
        self._step = round(VIDEO_CLOCK / fps)
        self._clock = clock
        self._t0: float | None = None
        self._pts = 0
        self.sent = 0
        self._sent_times: deque[float] = deque(maxlen=120)

    def _due(self, pts: int) -> float:
        assert self._t0 is not None
        return self._t0 + pts / VIDEO_CLOCK

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        if self._t0 is not None:  # pace: not before the next frame's time
            wait = self._due(self._pts + self._step) - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
        arr = await self.queue.get()
        now = self._clock()
        if self._t0 is None:
            self._t0, pts = now, 0
        else:
            pts = self._pts + self._step
            if now - self._due(pts) > 2.0 / self.fps:  # starved: resume at real time
                pts = round((now - self._t0) * VIDEO_CLOCK)
        self._pts = pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        frame.pts = pts
        frame.time_base = TIME_BASE
        self.sent += 1
        self._sent_times.append(now)
        return frame

    def fps_sent(self) -> float | None:
        """Frames per second sent over the last (up to) 120 frames."""
        t = self._sent_times
        if len(t) < 2 or t[-1] <= t[0]:
            return None
        return (len(t) - 1) / (t[-1] - t[0])
