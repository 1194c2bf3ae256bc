"""One viewer's WebRTC peer (aiortc): its connection, its paced video track and bounded frame queue,
and its data channel (parameters in, notices out). Event-loop thread only.

The peer does I/O and reports; what an event means (the session slot) is decided in
``pp1.fsm.session`` through ``pp1.server.core``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from .errors import ApiError
from .media import FrameQueue, PacedVideoTrack
from .schemas import IceCandidateInit, IceServerConfig

log = logging.getLogger("pp1.server.webrtc")

PeerKind = Literal["session", "watcher"]
MAX_PENDING_NOTICES = 16
CLOSE_TIMEOUT_S = 5.0


class Peer:
    """One remote viewer: the publishing session or a watcher."""

    def __init__(
        self,
        peer_id: str,
        kind: PeerKind,
        *,
        fps: float,
        queue_frames: int,
        ice_servers: list[IceServerConfig],
        on_state: Callable[[Peer, str], None],
        on_message: Callable[[Peer, str | bytes], None],
    ) -> None:
        self.id = peer_id
        self.kind: PeerKind = kind
        self.created_at = time.monotonic()
        self.queue = FrameQueue(queue_frames)
        self.track = PacedVideoTrack(self.queue, fps)
        self.channel: RTCDataChannel | None = None
        self.closed = False
        self._pending: list[str] = []
        self._on_state = on_state
        self._on_message = on_message
        config = RTCConfiguration(iceServers=[RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
                                              for s in ice_servers])
        self.pc = RTCPeerConnection(configuration=config)
        self.pc.addTrack(self.track)
        self.pc.on("connectionstatechange", self._state_changed)
        self.pc.on("datachannel", self._channel_opened)

    @property
    def connection(self) -> str:
        return self.pc.connectionState

    # -- negotiation --------------------------------------------------------------------------------
    async def answer(self, offer_sdp: str) -> str:
        """Apply the offer and return the SDP answer (every local candidate included: no trickle
        from the server). Raises ApiError 400 when aiortc refuses the offer."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            answer = await self.pc.createAnswer()
            await self.pc.setLocalDescription(answer)
        except Exception as exc:  # aiortc raises ValueError / InvalidStateError / assorted parse errors
            raise ApiError.field(400, "invalid_sdp", "sdp", f"the offer could not be applied: "
                                 f"{type(exc).__name__}: {exc}") from None
        return self.pc.localDescription.sdp

    async def add_candidates(self, candidates: list[IceCandidateInit]) -> None:
        """Trickle ICE; every candidate is parsed before any is added (a bad one changes nothing)."""
        parsed = []
        for i, c in enumerate(candidates):
            text = c.candidate.strip().removeprefix("a=").removeprefix("candidate:")
            if not text:
                parsed.append(None)  # end of candidates
                continue
            if c.sdpMid is None and c.sdpMLineIndex is None:
                raise ApiError.field(422, "invalid_candidate", f"candidates.{i}", "needs sdpMid or sdpMLineIndex")
            try:
                cand = candidate_from_sdp(text)
            except Exception:
                raise ApiError.field(422, "invalid_candidate", f"candidates.{i}.candidate",
                                     f"not an ICE candidate line: {c.candidate[:120]!r}") from None
            cand.sdpMid, cand.sdpMLineIndex = c.sdpMid, c.sdpMLineIndex
            parsed.append(cand)
        for cand in parsed:
            await self.pc.addIceCandidate(cand)

    # -- data channel -------------------------------------------------------------------------------
    def _channel_opened(self, channel: RTCDataChannel) -> None:
        if self.channel is not None:  # one channel per peer: later ones are ignored
            log.info("peer %s opened a second data channel %r: ignored", self.id, channel.label)
            return
        self.channel = channel
        channel.on("message", lambda msg: self._on_message(self, msg))
        pending, self._pending = self._pending, []
        for text in pending:
            self._send_text(text)

    def send(self, message: dict[str, Any]) -> None:
        """Send a notice on the data channel (queued, bounded, until the channel opens)."""
        text = json.dumps(message)
        if self.channel is not None and self.channel.readyState == "open":
            self._send_text(text)
        elif len(self._pending) < MAX_PENDING_NOTICES:
            self._pending.append(text)

    def _send_text(self, text: str) -> None:
        try:
            assert self.channel is not None
            self.channel.send(text)
        except Exception as exc:  # the channel closed meanwhile
            log.debug("peer %s: notice not sent: %s", self.id, exc)

    # -- state --------------------------------------------------------------------------------------
    def _state_changed(self) -> None:
        self._on_state(self, self.pc.connectionState)

    async def close(self, notice: dict[str, Any] | None = None, flush_s: float = 0.5) -> None:
        """Tell the viewer why (if a channel is open), let the message leave, close. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if notice is not None:
            self.send(notice)
            ch = self.channel
            deadline = time.monotonic() + flush_s
            while ch is not None and ch.readyState == "open" and ch.bufferedAmount > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if ch is not None and ch.readyState == "open":
                await asyncio.sleep(min(0.1, flush_s))  # SCTP hands the bytes to DTLS asynchronously
        self.track.stop()
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)
        except Exception as exc:  # bounded best effort
            log.warning("peer %s: close did not finish cleanly: %s", self.id, exc)
