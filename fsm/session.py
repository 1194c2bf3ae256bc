"""The server's session slot: one live session (one KV cache) per mesh, and what happens to it.

The front's mesh holds one KV cache, so the server admits one *publishing* session at a time (the
peer that started the stream and may change its parameters); any number of *watchers* may receive
the same frames. This machine is that slot. It decides admission (``offer_refusal``,
``watch_refusal``, ``parameters_refusal``), which peer events matter, and what the server must do
next (intents); the server's adapters (``pp1.server``) perform them and feed the results back.
No I/O here.

The loop the server runs (one asyncio thread)::

    refusal = m.offer_refusal()             # None, or why not (busy / closing / shutting down / failed)
    intents = m.on_offer(session_id)        # idle -> negotiating: [Negotiate]
        SDP refused, or the front refused start: m.on_rejected(session_id, reason) -> idle
    intents = m.on_answered(session_id)     # [StartFront]: front.start(initial parameters)
    m.on_peer_connected(session_id)         # negotiating -> streaming (ICE + DTLS up)
    m.on_peer_gone(peer_id, reason)         # DELETE, peer closed/failed, negotiation timeout:
                                            # the session's peer -> closing: [StopFront, ClosePeer]
                                            # a watcher -> [ClosePeer] (the slot is untouched)
    m.on_closed(session_id)                 # closing -> idle: the mesh is free for the next session
    m.on_front_ended(reason, failed=True)   # the mesh failed -> failed (cause kept): [CloseAllPeers]
    m.on_shutdown(reason)                   # SIGTERM -> shutdown: [CloseAllPeers, ShutdownFront]

Rules it holds:
- one publishing session at a time; a second offer is refused while one is negotiating, streaming
  or closing ("busy"/"closing"), and every offer or watch is refused once shutdown or failed;
- parameters are accepted only from a live session (negotiating or streaming);
- frames are forwarded to viewers only while a session is live (``forwards_frames``);
- an event about a peer that is not the session (a watcher, or a session already replaced) never
  moves the slot;
- ``shutdown`` and ``failed`` are terminal: the job drains (or exits non-zero and is restarted);
  a new server process starts a new slot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .base import FAILED, ProtocolMachine
from .intents import Intent

log = logging.getLogger("pp1.fsm.session")

IDLE = "idle"  # no session: the front heartbeats; an offer is admitted
NEGOTIATING = "negotiating"  # an offer was admitted: SDP answered, front started, waiting for the peer
STREAMING = "streaming"  # the session's peer is connected: frames flow to it and to watchers
CLOSING = "closing"  # the session ends: the front is stopped, its peer closed
SHUTDOWN = "shutdown"  # SIGTERM: nothing is admitted; every stream closed with the reason; the job drains

STATES = [IDLE, NEGOTIATING, STREAMING, CLOSING, SHUTDOWN, FAILED]
LIVE = frozenset({NEGOTIATING, STREAMING})

# (event, source(s), dest); "fail" -> failed from every non-terminal state is implied (the mesh failed).
TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    ("offer", IDLE, NEGOTIATING),  # a publisher's offer was admitted
    ("rejected", NEGOTIATING, IDLE),  # its SDP, or the front's start, was refused: nothing changed
    ("connected", NEGOTIATING, STREAMING),  # the session's peer connected
    ("close", [NEGOTIATING, STREAMING], CLOSING),  # DELETE, the peer left or failed, negotiation timed out
    ("closed", CLOSING, IDLE),  # front stopped and peer closed: the mesh is free
    ("shutdown", [IDLE, NEGOTIATING, STREAMING, CLOSING], SHUTDOWN),  # SIGTERM: stop admitting, drain
]

BINDINGS: dict[str, str] = {
    IDLE: "admit one offer (POST /api/v1/webrtc/offer); watchers may attach (POST /api/v1/webrtc/watch)",
    NEGOTIATING: "aiortc: setRemoteDescription + createAnswer (Negotiate), then FrontAPI.start(initial "
                 "parameters) (StartFront); wait for the peer to connect under a timeout",
    STREAMING: "frames from FrontAPI.subscribe paced onto every viewer's track; parameters (data channel, "
               "POST /api/v1/session/parameters) -> FrontAPI.update",
    CLOSING: "FrontAPI.stop() (StopFront), close the session's peer (ClosePeer); then closed",
    SHUTDOWN: "close every peer with the reason on its data channel (CloseAllPeers); "
              "FrontAPI.request_shutdown (ShutdownFront): the job drains and exits 0",
    FAILED: "close every peer with the cause on its data channel (CloseAllPeers); /ready answers 503 "
            "with the cause until the job exits non-zero and is restarted",
}

RefusalCode = Literal["busy", "closing", "shutting_down", "failed", "no_session"]


@dataclass(frozen=True)
class Refusal:
    """Why the slot refuses a request now: a code (the server maps it to an HTTP status) and a reason."""

    code: RefusalCode
    reason: str


# -- intents (performed by the server in list order) ----------------------------------------------------


@dataclass(frozen=True)
class Negotiate(Intent):
    """Answer the session's SDP offer (aiortc); then ``on_answered`` or ``on_rejected``."""

    session_id: str


@dataclass(frozen=True)
class StartFront(Intent):
    """``FrontAPI.start(initial parameters)``; refused -> ``on_rejected``."""

    session_id: str


@dataclass(frozen=True)
class StopFront(Intent):
    """``FrontAPI.stop()``: the front goes back to idle (heartbeats only)."""


@dataclass(frozen=True)
class ClosePeer(Intent):
    """Tell the peer why on its data channel (``stream_ended``), then close its connection."""

    peer_id: str
    reason: str


@dataclass(frozen=True)
class CloseAllPeers(Intent):
    """Every peer (the session and the watchers): ``stream_ended`` with the reason, then close."""

    reason: str
    failed: bool


@dataclass(frozen=True)
class ShutdownFront(Intent):
    """``FrontAPI.request_shutdown(reason)``: the whole job drains (SHUTDOWN through the mesh)."""

    reason: str


class SessionMachine(ProtocolMachine):
    """The server's session slot: one publishing session per mesh (one KV cache), watchers beside it."""

    NAME: ClassVar[str] = "session"
    STATES: ClassVar[list[str]] = STATES
    TRANSITIONS: ClassVar[list[tuple[str, str | list[str], str]]] = TRANSITIONS
    INITIAL: ClassVar[str] = IDLE
    TERMINAL: ClassVar[frozenset[str]] = frozenset({SHUTDOWN, FAILED})
    BINDINGS: ClassVar[dict[str, str]] = BINDINGS

    def __init__(self, rank: int = 0, **ctx: Any) -> None:
        self.session_id: str | None = None  # the publishing session, while negotiating / streaming / closing
        self.end_reason: str | None = None  # why the slot ended (shutdown or failed)
        super().__init__(rank, **{"role": "server", **ctx})

    # -- questions --------------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """A session is negotiating or streaming (its parameters are accepted)."""
        return self.state in LIVE

    @property
    def forwards_frames(self) -> bool:
        """Frames from the front go to the viewers (only while a session is live)."""
        return self.state in LIVE

    @property
    def admits_nothing(self) -> bool:
        """Shut down or failed: no offer, no watcher, no parameter is admitted any more."""
        return self.is_terminal

    def is_session(self, peer_id: str) -> bool:
        return self.session_id is not None and peer_id == self.session_id

    def offer_refusal(self) -> Refusal | None:
        """None when a new publishing session may start now, else why not."""
        if self.can_fire("offer"):
            return None
        terminal = self._terminal_refusal()
        if terminal is not None:
            return terminal
        if self.state == CLOSING:
            return Refusal("closing", f"the previous session {self.session_id} is closing; retry in a moment")
        return Refusal("busy", f"session {self.session_id} is live (one KV cache per mesh): watch it with "
                               "POST /api/v1/webrtc/watch, or retry when it ends")

    def watch_refusal(self) -> Refusal | None:
        """None when a watcher may attach now (any time before shutdown / failure)."""
        return self._terminal_refusal()

    def parameters_refusal(self) -> Refusal | None:
        """None when parameters may be applied now (a live session), else why not."""
        if self.live:
            return None
        return self._terminal_refusal() or Refusal("no_session", f"no live session (state {self.state}): "
                                                   "start one with POST /api/v1/webrtc/offer")

    def _terminal_refusal(self) -> Refusal | None:
        if self.state == SHUTDOWN:
            return Refusal("shutting_down", f"the server is shutting down: {self.end_reason}")
        if self.state == FAILED:
            return Refusal("failed", f"the mesh failed: {self.failure.reason if self.failure else self.end_reason}")
        return None

    # -- events from the server -------------------------------------------------------------------------
    def on_offer(self, session_id: str) -> list[Intent]:
        """Admit a publisher's offer (the caller checked ``offer_refusal``; else InvalidEvent)."""
        self.fire("offer")
        self.session_id = session_id
        log.info("session %s admitted", session_id)
        return [Negotiate(session_id)]

    def on_answered(self, session_id: str) -> list[Intent]:
        """The SDP answer is ready: start the front with the session's initial parameters."""
        if not (self.is_session(session_id) and self.live):
            return []
        return [StartFront(session_id)]

    def on_rejected(self, session_id: str, reason: str) -> list[Intent]:
        """The offer's SDP or the front's start was refused: nothing changed; the slot is free again."""
        if not self.is_session(session_id) or not self.can_fire("rejected"):
            return []
        self.fire("rejected")
        self.session_id = None
        log.info("session %s rejected: %s", session_id, reason)
        return [ClosePeer(session_id, reason)]

    def on_peer_connected(self, peer_id: str) -> list[Intent]:
        """A peer's connection is up; the session's moves the slot to streaming, others change nothing."""
        if self.is_session(peer_id) and self.can_fire("connected"):
            self.fire("connected")
        return []

    def on_peer_gone(self, peer_id: str, reason: str) -> list[Intent]:
        """DELETE, a peer that closed or failed, or a negotiation that timed out. The session's peer
        ends the session (stop the front, close the peer); any other peer is just closed."""
        if self.is_session(peer_id) and self.can_fire("close"):
            self.fire("close")
            log.info("session %s closing: %s", peer_id, reason)
            return [StopFront(), ClosePeer(peer_id, reason)]
        return [ClosePeer(peer_id, reason)]

    def on_negotiation_timeout(self, session_id: str, reason: str) -> list[Intent]:
        """The session's peer did not connect in time (only while still negotiating)."""
        if self.is_session(session_id) and self.can_fire("connected"):
            return self.on_peer_gone(session_id, reason)
        return []

    def on_closed(self, session_id: str) -> list[Intent]:
        """StopFront and ClosePeer are done: the mesh is free for the next session."""
        if self.is_session(session_id) and self.can_fire("closed"):
            self.fire("closed")
            self.session_id = None
        return []

    def on_front_ended(self, reason: str, *, failed: bool) -> list[Intent]:
        """The front ended every stream: the mesh failed (``failed``: the cause is kept) or the job is
        shutting down. Every peer is told why and closed."""
        if self.is_terminal:
            return []
        self.end_reason = reason
        if failed:
            self.fail_with(reason, "remote")
        else:
            self.fire("shutdown")
        return [CloseAllPeers(reason, failed)]

    def on_shutdown(self, reason: str) -> list[Intent]:
        """SIGTERM (or the app's shutdown): stop admitting, close every stream, drain the job."""
        if self.is_terminal:
            return []
        self.end_reason = reason
        self.fire("shutdown")
        return [CloseAllPeers(reason, False), ShutdownFront(reason)]
