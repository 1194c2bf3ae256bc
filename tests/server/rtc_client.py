"""An aiortc client for the server's tests: offers (session or watcher), collects decoded frames
and data-channel notices. HTTP through httpx (async)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


@dataclass
class Received:
    t: float
    mean_rgb: tuple[float, float, float]
    frame: np.ndarray | None = None


@dataclass
class RtcClient:
    base: str
    kind: str = "session"
    token: str | None = None
    keep_frames: bool = False
    pc: RTCPeerConnection = field(default_factory=RTCPeerConnection)
    frames: list[Received] = field(default_factory=list)
    notices: list[dict[str, Any]] = field(default_factory=list)
    session_id: str | None = None
    _reader: asyncio.Task | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def connect(self, initial: dict[str, Any] | None = None, timeout_s: float = 20.0) -> httpx.Response:
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("parameters")
        self.channel.on("message", lambda m: self.notices.append(json.loads(m)))
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body: dict[str, Any] = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        path = "/api/v1/webrtc/offer" if self.kind == "session" else "/api/v1/webrtc/watch"
        if self.kind == "session" and initial is not None:
            body["initialParameters"] = initial
        async with httpx.AsyncClient(base_url=self.base, timeout=timeout_s) as http:
            r = await http.post(path, json=body, headers=self.headers())
        if r.status_code == 200:
            ans = r.json()
            self.session_id = ans["sessionId"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=ans["sdp"], type=ans["type"]))
        return r

    def _on_track(self, track: Any) -> None:
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                arr = frame.to_ndarray(format="rgb24")
                mean = tuple(float(x) for x in arr.reshape(-1, 3).mean(axis=0))
                self.frames.append(Received(time.monotonic(), mean, arr if self.keep_frames else None))

    async def wait_frames(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.frames)} frames after {timeout_s} s (wanted {n}); "
                                   f"connection {self.pc.connectionState}; notices {self.notices}")
            await asyncio.sleep(0.05)

    async def wait_notice(self, kind: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            for n in self.notices:
                if n.get("type") == kind:
                    return n
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind!r} notice after {timeout_s} s: {self.notices}")
            await asyncio.sleep(0.05)

    async def wait_open(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.channel.readyState != "open":
            if time.monotonic() > deadline:
                raise TimeoutError("data channel did not open")
            await asyncio.sleep(0.05)

    def send(self, message: dict[str, Any] | str) -> None:
        self.channel.send(message if isinstance(message, str) else json.dumps(message))

    async def close(self, delete: bool = True) -> None:
        if delete and self.session_id:
            async with httpx.AsyncClient(base_url=self.base, timeout=10) as http:
                await http.delete(f"/api/v1/webrtc/offer/{self.session_id}", headers=self.headers())
        if self._reader is not None:
            self._reader.cancel()
        await asyncio.wait_for(self.pc.close(), 10)
