"""The front's loop (rank 0 under PP1, or pure TP's rank 0): the one owner of the way to the leader.

It drives its own loop over the contract of ``fsm/base.py``: every handler returns what to do next
(``SendEnvelope``, ``AwaitResult(until)``, ``Decode``, ``Show``, ``Idle(until)``, ``Exit``...), computed
by :meth:`FrontMachine._next` from its state and the state of the :class:`ChunkMachine` it owns
(ids, epochs, the recompute schedule, tripwires, the deadline). Its own table holds the phases:

    init --ping--> pinging --ping_answered--> warming (WarmPair) --pair_warm--> awaiting_ready
         --ready--> serving --stopped--> ended;  init --serve--> serving (pure TP: no PP channel)

The rules of the loop, each decided here and nowhere else:
- Startup (PP1): the PING envelope takes ``PING_CALL_ID`` and must be answered in kind within the warm
  bound; then one tensor round trip on the pair device group; then READY within its bound. The chunk
  machine's ids start after the PING (``FIRST_CALL_ID``).
- Overlap depth 1: when result k is accepted, its latents are kept as history, chunk k+1 is sent at
  once (when due), THEN k is decoded; k's frames are shown only if its epoch is still current when the
  decode ends (a hard cut during decode makes them stale). Over a link that does not overlap (pure TP's
  in-process leader runs the whole call in ``send``) k is decoded and shown before k+1 is planned.
- A re-encode recompute whose window starts in the chunk not decoded yet decodes that chunk first.
- History older than the oldest frame a later recompute window can start at is dropped.
- Headless runs: after ``max_chunks`` accepted chunks, ``after_chunks="shutdown"`` drains and shuts the job
  down; ``after_chunks="idle"`` keeps heartbeating until a stop request.
- Heartbeat: a NOOP when nothing was sent or received for H seconds; otherwise ``Idle`` until then.
- Pacing (a served stream, ``pace``): the mesh may compute faster than the viewers play. A chunk is
  planned only while the video planned so far runs at most ``pace.lead_s`` ahead of the wall clock
  (each chunk adds ``pace.chunk_s`` of video; a mesh that falls behind builds no credit); otherwise
  ``Idle`` until it may. So the viewers' queues hold about a chunk plus the lead, and no frame is made
  only to be dropped. A start, a pause or a resume of the stream starts the count afresh; a hard cut does
  not (the viewers' tracks play on). Headless runs (``pp1 run``, ``pp1 bench``) are not paced.
- Requests (stop, hard cut) come from other threads through the adapter, only between steps
  (``on_stop_requested`` / ``on_cut_requested`` return nothing: they change state, and the next step
  sees it). A stop before serving is kept and applied once serving starts (never lost).
- Failure: a deadline missed or a broken channel poisons it (no further send); otherwise, once READY came
  (the leader is in its loop), a best-effort farewell SHUTDOWN goes out under a short bound, then
  ``Exit(EXIT_FAILED)`` with the chunk machine's cause. SHUTDOWN answered: ``Exit(EXIT_OK)``.

With a ``lifecycle``, the loop moves it: ``channels_warm`` (pair warm), ``warmup_done`` (READY),
``drain`` (a stop applied), ``drained`` (SHUTDOWN answered), and its failure with the same cause.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, ReadyV1
from pp1.protocol.preflight import check_result_matches
from pp1.protocol.schedule import (
    PING_CALL_ID,
    decode_before_next,
    oldest_needed_frame,
    recompute_due,
    reencode_frame,
    window_start,
)

from .chunk import (
    CLOSING,
    IDLE,
    STOPPED,
    ChunkMachine,
    ChunkPlan,
    Decision,
    Verdict,
    envelope_from_plan,
)
from .chunk import FAILED as CHUNK_FAILED
from .intents import (
    EXIT_FAILED,
    EXIT_OK,
    AwaitReady,
    AwaitResult,
    Decode,
    Drop,
    Exit,
    Idle,
    Intent,
    KeepLatents,
    NextStep,
    SendEnvelope,
    Show,
    WarmPair,
)
from .lifecycle import LifecycleMachine, RoleMachine

log = logging.getLogger("pp1.fsm.front")

INIT, PINGING, WARMING, AWAITING_READY, SERVING, ENDED, FAILED = (
    "init", "pinging", "warming", "awaiting_ready", "serving", "ended", "failed",
)
STATES = [INIT, PINGING, WARMING, AWAITING_READY, SERVING, ENDED, FAILED]
TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    # (event, source(s), dest)
    ("ping", INIT, PINGING),  # SendEnvelope(PING), then AwaitResult within the warm bound
    ("ping_answered", PINGING, WARMING),  # WarmPair: one tensor round trip on the pair device group
    ("pair_warm", WARMING, AWAITING_READY),  # AwaitReady within the ready bound
    ("ready", AWAITING_READY, SERVING),  # READY: the chunk machine's loop
    ("serve", INIT, SERVING),  # pure TP: the in-process leader is warm already
    ("stopped", SERVING, ENDED),  # SHUTDOWN answered
    # "fail" (every non-terminal state -> failed): no PING answer / READY in time, a broken channel,
    # the chunk machine failed (deadline, tripwire, second failure in a row).
]

AfterChunks = Literal["shutdown", "idle", "serve"]  # after max_chunks (serve: none; a session starts the stream)
FAREWELL_BOUND_S = 1.0  # the best-effort SHUTDOWN after a failure never waits longer than this


@dataclass(frozen=True)
class Pace:
    """A served stream's pacing (module docstring): ``chunk_s``, the seconds of video one chunk shows (its
    frames / the stream's fps); ``lead_s``, how far the planned video may run ahead of the wall clock."""

    chunk_s: float
    lead_s: float

    @classmethod
    def of(cls, frames_per_chunk: int, fps: float, lead_chunks: float = 0.5) -> Pace:
        chunk_s = frames_per_chunk / fps
        return cls(chunk_s=chunk_s, lead_s=lead_chunks * chunk_s)


@dataclass
class _Outstanding:
    """A received chunk the loop still owes a decode (overlap depth 1), or the PING in flight."""

    call_id: int
    chunk_index: int
    cache_epoch: int
    recompute: bool
    sent_at: float
    received_at: float


class FrontMachine(RoleMachine):
    """The front's loop (see the module docstring). ``chunk``: the ChunkMachine it owns;
    ``geometry``: chunk sizes (latent frames a chunk, the attention window); ``overlap``: whether a send
    returns while the mesh computes (the PP channel) or runs the whole call (pure TP); ``ping``: PP1
    startup (PING, pair warm-up, READY) or not (pure TP); ``max_chunks``/``then``: headless runs
    (None: serve until stopped)."""

    NAME: ClassVar[str] = "front"
    STATES: ClassVar[list[str]] = STATES
    TRANSITIONS: ClassVar[list[tuple[str, str | list[str], str]]] = TRANSITIONS
    INITIAL: ClassVar[str] = INIT
    TERMINAL: ClassVar[frozenset[str]] = frozenset({ENDED, FAILED})

    def __init__(
        self,
        rank: int,
        *,
        chunk: ChunkMachine,
        geometry: ChunkGeometry,
        overlap: bool = True,
        ping: bool = True,
        warm_timeout_s: float = 20.0,
        ready_timeout_s: float = 600.0,
        max_chunks: int | None = None,
        after_chunks: AfterChunks = "shutdown",
        streaming: bool = True,
        pace: Pace | None = None,
        lifecycle: LifecycleMachine | None = None,
        **ctx: Any,
    ) -> None:
        super().__init__(rank, lifecycle=lifecycle, **ctx)
        self.chunk = chunk
        self.latent_frames = geometry.latent_frames
        self.window = geometry.max_context_frames
        self.overlap = overlap
        self.ping = ping
        self.warm_timeout_s = warm_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.max_chunks = max_chunks
        self.after_chunks: AfterChunks = after_chunks
        self.streaming = streaming  # a served front starts idle until a session starts the stream
        self.paused = False
        self.pace = pace
        self._paced_upto: float | None = None  # wall time the video planned so far reaches (pacing)
        self._paced_chunk: tuple[int, int] | None = None  # (epoch, chunk index) last counted (a retry is not)
        self.stream_epoch = 0  # the first epoch of the running stream (frames of older ones are not its)
        self.ready: ReadyV1 | None = None
        self.shown = 0  # chunks shown (every epoch)
        self._pending: _Outstanding | None = None  # received, not decoded yet
        self._decoding: _Outstanding | None = None
        self._decoded_upto: dict[int, int] = {}  # epoch -> latent frames decoded so far
        self._ping_sent_at: float | None = None
        self._sent_started_at: float | None = None  # when the engine began building the envelope in flight
        self._stop_pending = False
        self._went_idle = False

    # -- questions (for observers and the adapter's report) -------------------------------------------
    @property
    def accepted(self) -> int:
        """Chunks of the run so far: shown, plus the one received but not decoded yet if still current."""
        p = self._pending or self._decoding
        return self.shown + (1 if p is not None and self.chunk.is_current(p.cache_epoch) else 0)

    @property
    def done(self) -> bool:
        """A headless run has accepted its ``max_chunks``."""
        return self.max_chunks is not None and self.accepted >= self.max_chunks

    @property
    def wants_chunks(self) -> bool:
        """Chunks are planned: a stream runs, unpaused, and a headless run is not done."""
        return self.streaming and not self.paused and not self.done and self.max_chunks != 0

    # -- startup ------------------------------------------------------------------------------------
    def start(self, now: float) -> list[Intent]:
        """PP1: the PING; pure TP: the loop at once."""
        if not self.ping:
            self.fire("serve")
            return self._next(now)
        self.fire("ping")
        env = PPEnvelopeV1(action=Action.PING, call_id=PING_CALL_ID)
        return [SendEnvelope(env, timeout_s=self.warm_timeout_s)]

    def on_pair_warm(self, now: float) -> list[Intent]:
        self.fire("pair_warm")
        self._lifecycle_event("channels_warm")
        return [AwaitReady(until=now + self.ready_timeout_s)]

    def on_ready(self, ready: ReadyV1, now: float) -> list[Intent]:
        self.fire("ready")
        self.ready = ready
        self._lifecycle_event("warmup_done")
        log.info("front rank=%d READY: mesh of %d, warmup %s ms, fingerprint %s", self.rank, ready.mesh_size,
                 [round(x, 1) for x in ready.warmup_ms], ready.fingerprint)
        return self._next(now)

    # -- sends --------------------------------------------------------------------------------------
    def on_sent(self, now: float, started_at: float | None = None) -> list[Intent]:
        """The envelope asked for went out (``started_at``: when its building began)."""
        if self.state == PINGING:
            self._ping_sent_at = now
            return [AwaitResult(until=now + self.warm_timeout_s)]
        if self.state != SERVING:  # the farewell SHUTDOWN after a failure: nothing more to do
            return []
        self._sent_started_at = started_at if started_at is not None else now
        self.chunk.on_sent(now)
        return self._next(now)

    def on_local_error(self, reason: str) -> list[Intent]:
        """The envelope was refused before its first byte (a preflight): nothing was sent."""
        if self.state == SERVING:
            self.chunk.abort_plan(reason)
            return [NextStep()]
        if self.is_terminal:
            return []
        return self._fail(f"could not send: {reason}", "local")

    # -- results ------------------------------------------------------------------------------------
    def on_result(self, result: PPResultV1, now: float) -> list[Intent]:
        if self.state == PINGING:
            return self._on_ping_result(result, now)
        d = self.chunk.on_result(result, now)
        return self._on_decision(d, now)

    def _on_ping_result(self, result: PPResultV1, now: float) -> list[Intent]:
        try:
            check_result_matches(result, PPEnvelopeV1(action=Action.PING, call_id=PING_CALL_ID), RemoteProtocolError)
            if not result.ok:
                raise RemoteProtocolError("result.ok", f"PING answered ok=False: {result.error_message}", "bad_ping")
        except RemoteProtocolError as err:
            return self._fail(f"bad PING answer: {err}", "remote")
        self.fire("ping_answered")
        return [WarmPair()]

    def _on_decision(self, d: Decision, now: float) -> list[Intent]:
        v = d.verdict
        if v is Verdict.FAIL:
            c = d.cause
            return self._fail(c.reason if c else str(d.error), c.kind if c else "remote", blame=c.blame if c else None)
        if v is Verdict.STOPPED:
            self._lifecycle_event("drain")
            self._lifecycle_event("drained")
            self.fire("stopped")
            return [Exit(EXIT_OK, "stopped")]
        out: list[Intent] = []
        started = self._sent_started_at if self._sent_started_at is not None else now
        recompute = d.plan is not None and d.plan.do_kv_recompute
        if v is Verdict.EMIT:
            rec = _Outstanding(d.call_id, d.chunk_index, d.cache_epoch, recompute=recompute, sent_at=started,
                               received_at=now)
            first = d.chunk_index * self.latent_frames
            out.append(KeepLatents(call_id=d.call_id, cache_epoch=d.cache_epoch, first_frame=first,
                                   keep_from=oldest_needed_frame(d.chunk_index, self.latent_frames, self.window)))
            self._pending = rec
        elif v is Verdict.DISCARD_STALE and d.plan is not None and d.plan.action is Action.INFER:
            out.append(Drop(call_id=d.call_id, chunk_index=d.chunk_index, cache_epoch=d.cache_epoch,
                            recompute=recompute, sent_at=started, received_at=now,
                            why="stale: a hard cut came while it was in flight"))
        return [*out, NextStep()]

    def on_decoded(self, call_id: int, now: float) -> list[Intent]:
        """The chunk asked for is decoded: show it if its epoch is still current."""
        rec = self._decoding
        if rec is None or rec.call_id != call_id:
            return self._fail(f"decoded call_id={call_id}, but the loop asked for "
                              f"{rec.call_id if rec else None}", "local")
        self._decoding = None
        epoch_frames = (rec.chunk_index + 1) * self.latent_frames
        self._decoded_upto[rec.cache_epoch] = max(self._decoded_upto.get(rec.cache_epoch, 0), epoch_frames)
        if self.chunk.is_current(rec.cache_epoch):
            self.shown += 1
            out: list[Intent] = [Show(call_id=call_id)]
        else:
            out = [Drop(call_id=call_id, chunk_index=rec.chunk_index, cache_epoch=rec.cache_epoch,
                        recompute=rec.recompute, sent_at=rec.sent_at, received_at=rec.received_at,
                        why="stale: a hard cut came while it was decoded")]
        return [*out, NextStep()]

    # -- waits that ran out, broken channels ---------------------------------------------------------
    def on_timed_out(self, now: float) -> list[Intent]:
        """A bounded wait ran out (the channel is poisoned): the PING, the pair's warm-up, READY, a result's
        deadline, or a send the leader did not take within its bound."""
        if self.is_terminal:  # the farewell SHUTDOWN's send ran out: its Exit follows
            return []
        if self.state == PINGING:
            return self._fail(f"no answer to the PING within {self.warm_timeout_s:g} s", "remote", poisoned=True)
        if self.state == AWAITING_READY:
            return self._fail(f"no READY from the leader within {self.ready_timeout_s:g} s", "remote",
                              poisoned=True)
        if self.state != SERVING:
            return self._fail(f"the pair's warm-up did not complete within {self.warm_timeout_s:g} s", "remote",
                              poisoned=True)
        due = self.chunk.deadline_at()
        if due is None:  # nothing awaited: the send itself ran out
            return self._on_decision(self.chunk.poison("the leader did not take the envelope within its bound"),
                                     now)
        return self._on_decision(self.chunk.on_deadline_missed(max(now, due)), now)

    def on_peer_gone(self, reason: str, peer: int | None = None) -> list[Intent]:
        if self.state != SERVING:
            return self._fail(f"lost the leader during {self.state}: {reason}", "remote", poisoned=True)
        return self._on_decision(self.chunk.poison(f"channel broke: {reason}"), 0.0)

    def on_bad_message(self, reason: str) -> list[Intent]:
        if self.state != SERVING:
            return self._fail(f"bad message from the leader during {self.state}: {reason}", "remote",
                              poisoned=True)
        return self._on_decision(self.chunk.poison(f"receive failed: {reason}"), 0.0)

    # -- requests from other threads (between steps only) ---------------------------------------------
    def on_stop_requested(self, now: float) -> list[Intent]:
        """SIGTERM / Ctrl-C / the server's shutdown: admit no new work; drain, then SHUTDOWN."""
        if self.state != SERVING:
            self._stop_pending = not self.is_terminal
            return []
        self._apply_stop()
        return []

    def on_drain(self, now: float) -> list[Intent]:
        """A signal in serving: the same as a stop request."""
        return self.on_stop_requested(now)

    def on_cut_requested(self, reason: str, now: float, seed: int | None = None,
                         recompute_every: int | None = None) -> list[Intent]:
        """A hard cut (prompt change, reset): epoch + 1; a chunk in flight is received and dropped."""
        self._cut(reason, seed, recompute_every)
        return []

    def on_stream_requested(self, on: bool, now: float, seed: int | None = None,
                            recompute_every: int | None = None) -> list[Intent]:
        """A session starts the stream (a fresh epoch and KV cache: nothing of an earlier session is
        shown) or ends it (back to heartbeats; what is in flight is received and dropped)."""
        if self._cut("stream started" if on else "stream stopped", seed, recompute_every):
            self.streaming, self.paused = on, False
            self.stream_epoch = self.chunk.cache_epoch
            self._paced_upto = None
        return []

    def on_pause_requested(self, paused: bool, now: float) -> list[Intent]:
        """Pause: no new chunk is planned (heartbeats keep flowing), the cache is kept; resume plans again."""
        if self.state == SERVING and not self.is_terminal:
            if paused != self.paused:
                self._paced_upto = None
            self.paused = paused
        return []

    def _cut(self, reason: str, seed: int | None, recompute_every: int | None) -> bool:
        if self.state == SERVING and self.chunk.can_fire("cut"):
            self.chunk.hard_cut(reason, seed=seed, recompute_every=recompute_every)
            return True
        log.warning("front rank=%d %s ignored in state %s/%s", self.rank, reason, self.state, self.chunk.state)
        return False

    def on_wake(self, now: float) -> list[Intent]:
        """After ``Idle`` or ``NextStep`` (requests from other threads were applied meanwhile): the next step."""
        return self._next(now)

    def _apply_stop(self) -> None:
        if self.chunk.can_fire("stop"):
            self.chunk.request_stop()
            self._lifecycle_drain()

    # -- the loop -----------------------------------------------------------------------------------
    def _next(self, now: float) -> list[Intent]:
        """What to do now (serving): the one place the front's loop is decided."""
        if self._pending is not None and not self.chunk.is_current(self._pending.cache_epoch):
            rec, self._pending = self._pending, None  # a hard cut since it arrived: never decoded
            return [Drop(call_id=rec.call_id, chunk_index=rec.chunk_index, cache_epoch=rec.cache_epoch,
                         recompute=rec.recompute, sent_at=rec.sent_at, received_at=rec.received_at,
                         why="stale: a hard cut came before it was decoded"), *self._next(now)]
        c = self.chunk
        if c.state == CHUNK_FAILED:
            f = c.failure
            return self._fail(f.reason if f else "failed", f.kind if f else "remote", blame=f.blame if f else None)
        if c.state == STOPPED:
            return []
        if self._stop_pending:
            self._stop_pending = False
            self._apply_stop()
        if self._pending is not None and not self.overlap:  # serial link: show k, then compute k+1
            return [self._decode()]
        if self.done and self.after_chunks == "shutdown" and c.state == IDLE:
            self._apply_stop()
        held = self._paced_until(now) if c.state == IDLE and self.wants_chunks else None
        plan: ChunkPlan | None = None
        if c.state == CLOSING:
            plan = c.plan_shutdown()
        elif c.state == IDLE and self.wants_chunks and held is None:
            if self._pending is not None and self._needs_decoded_first():
                return [self._decode()]  # the frame to re-encode is in chunk k: decode it before k+1 goes
            plan = c.plan_next(now)
            self._count_paced(plan, now)
        elif c.state == IDLE and c.noop_due(now):
            plan = c.plan_noop(now)
        if plan is not None:
            return [self._send(plan)]
        if self._pending is not None:  # overlap: k+1 went out (if due), now decode k
            return [self._decode()]
        if c.waiting:
            due = c.deadline_at()
            assert due is not None
            return [AwaitResult(until=due)]
        last = c.last_activity if c.last_activity is not None else now
        until = last + c.heartbeat_s
        return [Idle(until=until if held is None else min(until, held))]

    def _paced_until(self, now: float) -> float | None:
        """When the next chunk may be planned, if not now (pacing: the module docstring)."""
        if self.pace is None or self._paced_upto is None:
            return None
        due = self._paced_upto - self.pace.lead_s
        return due if due > now else None

    def _count_paced(self, plan: ChunkPlan, now: float) -> None:
        """A chunk planned: its video is counted once (a retry of the same chunk is not)."""
        key = (plan.cache_epoch, plan.chunk_index)
        if self.pace is None or key == self._paced_chunk:
            return
        self._paced_chunk = key
        self._paced_upto = max(self._paced_upto or now, now) + self.pace.chunk_s

    def _needs_decoded_first(self) -> bool:
        c = self.chunk
        k = c.position
        if c.context_source != "reencode" or not recompute_due(k, c.recompute_every):
            return False
        return decode_before_next(k, self.latent_frames, c.kv.context_frames(),
                                  self._decoded_upto.get(c.cache_epoch, 0))

    def _send(self, plan: ChunkPlan) -> SendEnvelope:
        ctx_start, reencode = 0, None
        if plan.do_kv_recompute:
            ctx_start = window_start(plan.chunk_index, self.latent_frames, plan.context_frames)
            if plan.context_source == "reencode":
                reencode = reencode_frame(plan.chunk_index, self.latent_frames, plan.context_frames)
        env = envelope_from_plan(plan)
        return SendEnvelope(env, timeout_s=self.chunk.deadline_s(), context_frames=plan.context_frames,
                            context_start=ctx_start, reencode=reencode)

    def _decode(self) -> Decode:
        rec, self._pending = self._pending, None
        assert rec is not None
        self._decoding = rec
        return Decode(call_id=rec.call_id, chunk_index=rec.chunk_index, cache_epoch=rec.cache_epoch,
                      first_frame=rec.chunk_index * self.latent_frames, recompute=rec.recompute,
                      sent_at=rec.sent_at, received_at=rec.received_at)

    # -- failure ------------------------------------------------------------------------------------
    def _fail(self, reason: str, kind: str, poisoned: bool = False, blame: int | None = None) -> list[Intent]:
        if blame is None and kind != "local":
            blame = self.chunk.peer_rank  # the front's one peer: the leader
        if not self.is_terminal:
            self.fail_with(reason, "local" if kind == "local" else "remote", blame)
            log.error("front rank=%d FAILED: %s", self.rank, reason)
        out: list[Intent] = []
        if self._pending is not None:  # received, never to be shown
            rec, self._pending = self._pending, None
            out.append(Drop(call_id=rec.call_id, chunk_index=rec.chunk_index, cache_epoch=rec.cache_epoch,
                            recompute=rec.recompute, sent_at=rec.sent_at, received_at=rec.received_at,
                            why="the mesh failed"))
        if not poisoned and not self.chunk.is_terminal:
            self.chunk.fail_with(reason, "local" if kind == "local" else "remote", blame)
        before_ready = self.ping and self.ready is None  # the leader is not in its loop yet: it takes no SHUTDOWN
        farewell = None if poisoned or before_ready else self.chunk.farewell_plan()
        if farewell is not None:
            out.append(SendEnvelope(envelope_from_plan(farewell),
                                    timeout_s=min(FAREWELL_BOUND_S, 4 * self.chunk.heartbeat_s)))
        return [*out, Exit(EXIT_FAILED, reason)]
