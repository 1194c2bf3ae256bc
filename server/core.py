"""The server's core (event-loop thread): the session slot (``pp1.fsm.session.SessionMachine``), the
peers, the frames from the front to every viewer, and the FrontAPI calls.

It feeds the slot events and performs the intents it returns; the routes of ``pp1.server.app``
call it. Every refusal is raised (``ApiError``) before anything changed.

Threads: everything here runs on the event loop, except (a) the front's subscriber callback
(``_from_front``, called on the front's comms thread: it only hands the event to the loop) and
(b) ``FrontAPI.start / update / stop``, run in a worker thread (``asyncio.to_thread``) one at a
time (``_front_lock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pp1.fsm.intents import Intent
from pp1.fsm.session import (
    STATES,
    CloseAllPeers,
    ClosePeer,
    Negotiate,
    SessionMachine,
    ShutdownFront,
    StartFront,
    StopFront,
)

from .errors import ApiError
from .front_api import (
    FrameBatch,
    FrontAPI,
    FrontEvent,
    FrontRefused,
    FrontStatus,
    StreamEnded,
    StreamParameters,
)
from .media import frames_as_numpy
from .metrics import FrontCollector, ServerMetrics
from .parameters import merged, parse_message, refuse_unsupported
from .schemas import (
    IceCandidateRequest,
    ParametersResponse,
    ServerStatus,
    ViewerStatus,
    WatchRequest,
    WebRTCOfferRequest,
    WebRTCOfferResponse,
)
from .sdp import check_offer
from .settings import ServerSettings
from .webrtc import Peer, PeerKind

log = logging.getLogger("pp1.server.core")

FRONT_REFUSAL_STATUS = {"not_ready": 503, "busy": 409, "no_stream": 409, "unsupported": 422, "invalid": 422}


def _front_error(exc: FrontRefused, prefix: str = "") -> ApiError:
    status = FRONT_REFUSAL_STATUS.get(exc.code, 422)
    if exc.field:
        field = f"{prefix}.{exc.field}" if prefix else exc.field
        return ApiError.field(status, exc.code, field, exc.reason)
    return ApiError(status, exc.code, exc.reason)


class ServerCore:
    def __init__(self, front: FrontAPI, settings: ServerSettings) -> None:
        self.front = front
        self.settings = settings
        self.info = front.info()
        self.machine = SessionMachine(0)
        self.metrics = ServerMetrics()
        self.peers: dict[str, Peer] = {}
        self.parameters: dict[str, Any] = {}
        self.started_at = time.time()
        self.frames_in = 0
        self.frames_dropped = 0
        self._epoch: int | None = None  # the newest epoch whose frames came
        self.queue_frames = settings.queue_frames or max(2 * self.info.chunk_frames, round(self.info.fps))
        self._frames_sent_closed = 0  # frames sent by peers that are gone
        self._front_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.metrics.add_collector(FrontCollector(self.front.status, lambda: self.machine.state, list(STATES),
                                                  self.frames_sent))

    # -- lifecycle --------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.front.subscribe(self._from_front)

    async def shutdown(self, reason: str = "server shutting down") -> None:
        """SIGTERM / app shutdown: stop admitting, close every stream with the reason, drain the job."""
        await self.perform(self.machine.on_shutdown(reason))
        await self._close_all(reason, failed=False)  # peers of a slot that had already ended
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in list(self._tasks):
            task.cancel()

    def shutdown_threadsafe(self, reason: str) -> None:
        """From a signal handler's helper thread: schedule ``shutdown`` on the loop."""
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.shutdown(reason), self._loop)

    # -- the front's events (comms thread -> loop) ------------------------------------------------------
    def _from_front(self, event: FrontEvent) -> None:
        """Called on the front's comms thread: hand the event to the loop and return at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._on_front_event, event)

    def _on_front_event(self, event: FrontEvent) -> None:
        if isinstance(event, FrameBatch):
            self._deliver(event)
        elif isinstance(event, StreamEnded):
            reason = f"{event.reason}: {event.detail}" if event.detail else event.reason
            intents = self.machine.on_front_ended(reason, failed=event.reason == "mesh_failed")
            self._spawn(self.perform(intents, cause=event))

    def _deliver(self, batch: FrameBatch) -> None:
        try:
            frames = frames_as_numpy(batch.frames)
        except ValueError as exc:
            log.error("front delivered bad frames (chunk %d, epoch %d): %s", batch.chunk_index, batch.cache_epoch, exc)
            return
        n = int(frames.shape[0])
        self.frames_in += n
        self.metrics.frames_in.inc(n)
        newer = self._epoch is not None and batch.cache_epoch > self._epoch  # a hard cut's first frames
        if self._epoch is None or newer:
            self._epoch = batch.cache_epoch
        if not self.machine.forwards_frames:
            self.frames_dropped += n
            self.metrics.frames_dropped.labels(reason="not_live").inc(n)
            return
        for peer in list(self.peers.values()):
            if peer.closed:
                continue
            if newer and (old := peer.queue.supersede()):
                self.metrics.frames_dropped.labels(reason="superseded").inc(old)
            dropped = sum(peer.queue.put(frames[i]) for i in range(n))
            if dropped:
                self.frames_dropped += dropped
                self.metrics.frames_dropped.labels(reason="queue_full").inc(dropped)

    # -- intents ------------------------------------------------------------------------------------------
    async def perform(self, intents: list[Intent], *, cause: StreamEnded | None = None,
                      negotiate: Callable[[], Awaitable[None]] | None = None,
                      start: Callable[[], Awaitable[None]] | None = None) -> None:
        """Perform the slot's intents in order. ``negotiate`` / ``start``: what Negotiate / StartFront
        mean for the offer being handled (they raise ApiError to refuse)."""
        for it in intents:
            if isinstance(it, Negotiate):
                assert negotiate is not None, "Negotiate outside an offer"
                await negotiate()
            elif isinstance(it, StartFront):
                assert start is not None, "StartFront outside an offer"
                await start()
            elif isinstance(it, StopFront):
                try:
                    await self._front_call(self.front.stop)
                except Exception as exc:  # the front is going away; the slot moves on
                    log.warning("front.stop failed: %s", exc)
            elif isinstance(it, ClosePeer):
                await self._close_peer(it.peer_id, it.reason)
            elif isinstance(it, CloseAllPeers):
                await self._close_all(it.reason, failed=it.failed, cause=cause)
            elif isinstance(it, ShutdownFront):
                self.front.request_shutdown(it.reason)
            else:  # pragma: no cover - a new intent without its adapter
                raise TypeError(f"no adapter for intent {it!r}")

    async def _front_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._front_lock:
            return await asyncio.to_thread(fn, *args)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("server task failed: %r", task.exception())

    # -- peers ------------------------------------------------------------------------------------------
    def _new_peer(self, kind: PeerKind) -> Peer:
        peer = Peer(uuid.uuid4().hex, kind, fps=self.info.fps, queue_frames=self.queue_frames,
                    ice_servers=self.settings.ice_servers, on_state=self._peer_state, on_message=self._peer_message)
        self.peers[peer.id] = peer
        self._count_viewers()
        return peer

    def _count_viewers(self) -> None:
        for kind in ("session", "watcher"):
            self.metrics.viewers.labels(kind=kind).set(sum(1 for p in self.peers.values() if p.kind == kind))

    def _peer_state(self, peer: Peer, state: str) -> None:
        log.info("peer %s (%s): connection %s", peer.id, peer.kind, state)
        if state == "connected":
            self._spawn(self.perform(self.machine.on_peer_connected(peer.id)))
        elif state in ("failed", "closed") and not peer.closed:
            self._spawn(self.end_peer(peer.id, f"peer connection {state}"))

    async def end_peer(self, peer_id: str, reason: str) -> None:
        """A peer is gone or asked to go (DELETE): the slot decides what else ends with it."""
        was_session = self.machine.is_session(peer_id)
        await self.perform(self.machine.on_peer_gone(peer_id, reason))
        if was_session:
            self.machine.on_closed(peer_id)
            if not self.machine.live:
                self.parameters = {}

    async def _close_peer(self, peer_id: str, reason: str, notice: dict[str, Any] | None = None) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        self._frames_sent_closed += peer.track.sent
        self._count_viewers()
        await peer.close(notice or {"type": "stream_ended", "reason": "closed", "detail": reason},
                         flush_s=self.settings.close_flush_s)

    async def _close_all(self, reason: str, *, failed: bool, cause: StreamEnded | None = None) -> None:
        notice: dict[str, Any] = {"type": "stream_ended", "reason": "mesh_failed" if failed else "shutdown",
                                  "detail": reason}
        if cause is not None and cause.cause is not None:
            notice["cause"] = cause.cause.model_dump()
        await asyncio.gather(*(self._close_peer(pid, reason, notice) for pid in list(self.peers)),
                             return_exceptions=True)

    def frames_sent(self) -> int:
        return self._frames_sent_closed + sum(p.track.sent for p in self.peers.values())

    # -- requests ---------------------------------------------------------------------------------------
    def _require_ready(self) -> FrontStatus:
        st = self.front.status()
        if not st.ready:
            raise ApiError(503, "not_ready", f"the mesh is not ready: {readiness_reason(st)}")
        return st

    def _refuse(self, err: ApiError) -> ApiError:
        self.metrics.refusals.labels(code=err.code).inc()
        return err

    def _check_room(self) -> None:
        if len(self.peers) >= self.settings.max_viewers:
            raise ApiError(429, "too_many_viewers", f"{len(self.peers)} viewers connected (max "
                           f"{self.settings.max_viewers}, --max-viewers)")

    async def offer(self, req: WebRTCOfferRequest) -> WebRTCOfferResponse:
        """A publisher's offer: the one live session. Checks everything, then negotiates, then starts
        the front; any refusal on the way leaves the slot, the front and the peers as they were."""
        try:
            params = req.initialParameters or StreamParameters()
            refuse_unsupported(params, self.info, "initialParameters")
            check_offer(req.sdp)
            refusal = self.machine.offer_refusal()
            if refusal is not None:
                raise ApiError.from_refusal(refusal)
            self._require_ready()
            self._check_room()
        except ApiError as err:
            self.metrics.offers.labels(kind="session", outcome="refused").inc()
            raise self._refuse(err) from None
        peer = self._new_peer("session")
        answer: list[str] = []

        async def negotiate() -> None:
            answer.append(await peer.answer(req.sdp))
            await self.perform(self.machine.on_answered(peer.id), start=start)

        async def start() -> None:
            try:
                await self._front_call(self.front.start, params)
            except FrontRefused as exc:
                raise _front_error(exc, "initialParameters") from None

        try:
            await self.perform(self.machine.on_offer(peer.id), negotiate=negotiate)
        except ApiError as err:
            await self.perform(self.machine.on_rejected(peer.id, str(err)))
            await self._close_peer(peer.id, str(err))  # when the slot had moved on already
            self.metrics.offers.labels(kind="session", outcome="refused").inc()
            raise self._refuse(err) from None
        self.parameters = params.given()
        self.parameters.pop("reset_cache", None)
        self.metrics.offers.labels(kind="session", outcome="admitted").inc()
        self._spawn(self._negotiation_deadline(peer.id))
        return WebRTCOfferResponse(sdp=answer[0], sessionId=peer.id)

    async def _negotiation_deadline(self, session_id: str) -> None:
        await asyncio.sleep(self.settings.negotiation_timeout_s)
        intents = self.machine.on_negotiation_timeout(
            session_id, f"the peer did not connect within {self.settings.negotiation_timeout_s:g} s")
        if intents:
            await self.perform(intents)
            self.machine.on_closed(session_id)
            self.parameters = {}

    async def watch(self, req: WatchRequest) -> WebRTCOfferResponse:
        """A watcher: the live stream's frames, no say over its parameters."""
        try:
            check_offer(req.sdp)
            refusal = self.machine.watch_refusal()
            if refusal is not None:
                raise ApiError.from_refusal(refusal)
            self._check_room()
        except ApiError as err:
            self.metrics.offers.labels(kind="watcher", outcome="refused").inc()
            raise self._refuse(err) from None
        peer = self._new_peer("watcher")
        try:
            sdp = await peer.answer(req.sdp)
        except ApiError as err:
            await self._close_peer(peer.id, str(err))
            self.metrics.offers.labels(kind="watcher", outcome="refused").inc()
            raise self._refuse(err) from None
        self.metrics.offers.labels(kind="watcher", outcome="admitted").inc()
        self._spawn(self._watch_deadline(peer.id))
        return WebRTCOfferResponse(sdp=sdp, sessionId=peer.id)

    async def _watch_deadline(self, peer_id: str) -> None:
        await asyncio.sleep(self.settings.negotiation_timeout_s)
        peer = self.peers.get(peer_id)
        if peer is not None and peer.connection not in ("connected",):
            await self.end_peer(peer_id, "the watcher did not connect in time")

    def _peer(self, peer_id: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise self._refuse(ApiError.field(404, "unknown_session", "session_id", f"no session or watcher "
                                              f"{peer_id!r} (it ended, or never existed)"))
        return peer

    async def add_candidates(self, peer_id: str, req: IceCandidateRequest) -> None:
        peer = self._peer(peer_id)
        try:
            await peer.add_candidates(req.candidates)
        except ApiError as err:
            raise self._refuse(err) from None

    async def delete(self, peer_id: str) -> None:
        self._peer(peer_id)
        await self.end_peer(peer_id, "closed by the client (DELETE)")

    async def set_parameters(self, params: StreamParameters, prefix: str = "") -> ParametersResponse:
        """Apply a partial update to the live session (REST or data channel)."""
        try:
            refuse_unsupported(params, self.info, prefix)
            refusal = self.machine.parameters_refusal()
            if refusal is not None:
                raise ApiError.from_refusal(refusal)
            if not params.given():
                raise ApiError.field(422, "invalid_parameters", prefix or "(body)", "no parameter given")
            await self._front_call(self.front.update, params)
        except FrontRefused as exc:
            raise self._refuse(_front_error(exc, prefix)) from None
        except ApiError as err:
            raise self._refuse(err) from None
        self.parameters = merged(self.parameters, params)
        return self.get_parameters()

    def get_parameters(self) -> ParametersResponse:
        sid = self.machine.session_id if self.machine.live else None
        return ParametersResponse(sessionId=sid, parameters=dict(self.parameters) if sid else {})

    def _peer_message(self, peer: Peer, message: str | bytes) -> None:
        self._spawn(self._channel_message(peer, message))

    async def _channel_message(self, peer: Peer, message: str | bytes) -> None:
        """A data-channel message: parameters from the session; anything wrong is answered on the
        channel (``{"type": "error", ...}``) and changes nothing."""
        try:
            if peer.kind != "session" or not self.machine.is_session(peer.id):
                raise ApiError(403, "watcher", "a watcher cannot change the stream's parameters")
            params = parse_message(message)
            resp = await self.set_parameters(params)
        except ApiError as err:
            self.metrics.channel_messages.labels(outcome="refused").inc()
            peer.send({"type": "error", "status": err.status, **err.body()})
            return
        self.metrics.channel_messages.labels(outcome="applied").inc()
        peer.send({"type": "parameters_applied", "parameters": resp.parameters})

    # -- reports ----------------------------------------------------------------------------------------
    def server_status(self) -> ServerStatus:
        viewers = [ViewerStatus(id=p.id, kind=p.kind, connection=p.connection, frames_sent=p.track.sent,
                                frames_dropped=p.queue.dropped, frames_superseded=p.queue.superseded,
                                queued=len(p.queue), fps=p.track.fps_sent())
                   for p in self.peers.values()]
        return ServerStatus(session_state=self.machine.state, session_id=self.machine.session_id, viewers=viewers,
                            frames_in=self.frames_in, frames_dropped=self.frames_dropped, started_at=self.started_at)


def readiness_reason(st: FrontStatus) -> str:
    """One line saying why the mesh is (not) ready: the failure cause, else each rank's state."""
    if st.ready:
        return "ready"
    if st.failure is not None:
        f = st.failure
        return f"rank {f.rank} failed in {f.phase} ({f.kind}): {f.reason}"
    ranks = ", ".join(f"rank {r.rank} ({r.role}) {r.state}" + (f" [{r.phase}]" if r.phase else "") for r in st.ranks)
    return ranks or f"pipeline {st.pipeline.status}"
